"""Model-family faults a fresh user found (2026-12-03): a scaled q on the q/k/v GEMM's range, learned
scales a user's own loop takes through zero, calibration of learned ranges, exporter failures, a
refusal that named the wrong kernel. Each test failed on the code before its fix."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quantcore
from quantcore.errors import CalibrationError, UserError

FT2 = {"version": 1, "name": "t", "placement": {"family": "vit", "mode": "ft2"},
       "quant": {"weights": {"bits": 8, "symmetric": True, "per_channel": True},
                 "activations": {"bits": 8, "symmetric": True}},
       "calibration": {"method": "max"}}


def _vit(fused: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).eval()
    for b in m.blocks:
        b.attn.fused_attn = fused
    return m


class _MHA(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.nw = need_weights
        self.patch = nn.Conv2d(3, 64, 8, 8)
        self.mha = nn.MultiheadAttention(64, 2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head((x + self.mha(x, x, x, need_weights=self.nw)[0]).mean(1))


def _q_codes(model, x, attn: str) -> tuple[float, list[list[str]]]:
    """How much of its grid q_quantizer's input uses (max |q| / amax), and the share groups."""
    qs = quantcore.quantizers(model)
    seen = {}
    def hook(mod, inputs, output) -> None:  # returns None: the output stays the module's
        seen.setdefault("q", float(inputs[0].abs().max()))

    h = qs[f"{attn}.q_quantizer"].register_forward_hook(hook)
    quantcore.calibrate(model, [x])
    h.remove()
    return seen["q"] / float(qs[f"{attn}.q_quantizer"].amax.max()), model.quantcore_placement.share_groups


@pytest.mark.parametrize("case", ["timm-explicit", "timm-fused", "mha-math", "mha-sdpa"])
def test_ft2_shares_one_range_only_among_tensors_that_are_the_gemm_output(case):
    """ft2 gave q/k/v the qkv GEMM output's range; on an explicit attention path q is q * d**-0.5 by
    then, and sat on ~1/8 of the codes (15 of 127 on timm, 13 on nn.MultiheadAttention's math path)."""
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    if case.startswith("timm"):
        m, attn, gemm = _vit(case == "timm-fused"), "blocks.0.attn", "blocks.0.attn.qkv.output_quantizer"
    else:
        m, attn, gemm = _MHA(case == "mha-math").eval(), "mha", None
    quantcore.prepare(m, FT2, example_input=x)
    use, groups = _q_codes(m, x, attn)
    group = next(g for g in groups if f"{attn}.k_quantizer" in g)
    assert f"{attn}.v_quantizer" in group and (gemm is None or gemm in group)
    scaled = case in ("timm-explicit", "mha-math")
    assert (f"{attn}.q_quantizer" in group) is not scaled, group
    assert use > 0.5, f"q uses {use:.0%} of its grid"
    notes = " ".join(m.quantcore_placement.notes)
    assert ("keeps a range of its own" in notes) is scaled


def test_a_learned_scale_taken_through_zero_keeps_a_positive_grid_and_convert_keeps_outputs():
    from quantcore.formats import QuantSpec
    from quantcore.quantizer import TensorQuantizer

    q = TensorQuantizer(QuantSpec(bits=8, symmetric=True), kind="activation")
    q.set_range(-1.0, 1.0)
    q.make_learnable()
    x = torch.tensor([-1.0, -0.504, 0.0, 0.504, 1.0, 128 / 127])
    with torch.no_grad():
        ref = q(x).clone()
        q.scale.neg_()  # a user's optimizer step across zero
        flipped = q(x).clone()
    assert torch.equal(flipped, ref)  # |scale|: the grid of the positive scale, not a mirrored one
    y = q(x.requires_grad_())
    y.sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    q.convert()
    assert torch.equal(q(x.detach()), ref)
    z = TensorQuantizer(QuantSpec(bits=8, symmetric=True), kind="activation")
    z.set_range(-1.0, 1.0)
    z.make_learnable()
    with torch.no_grad():
        z.scale.zero_()
        assert torch.isfinite(z(x.detach())).all()  # was NaN


def test_calibrating_learned_ranges_is_refused_until_converted():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    quantcore.prepare(m, {"version": 1, "name": "t", "calibration": {"method": "max"}}, example_input=x)
    quantcore.calibrate(m, [x])
    from quantcore.qat import learnable_quantizers

    assert learnable_quantizers(m)
    with pytest.raises(CalibrationError, match="learned .QAT. range.*convert"):
        quantcore.calibrate(m, [x * 10])
    quantcore.convert(m)
    quantcore.calibrate(m, [x * 10])  # the new statistics now set the ranges
    amax = float(quantcore.quantizers(m)["0.input_quantizer"].amax)
    assert amax == pytest.approx(float((x * 10).abs().max()), rel=1e-6)


def test_an_operator_the_exporter_cannot_write_is_an_export_error_naming_it(tmp_path):
    class Fold(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            y = self.conv(x)
            cols = nn.functional.unfold(y, 2, stride=2)
            y = nn.functional.fold(cols, (8, 8), 2, stride=2)
            return self.head(y.flatten(1))

    m = Fold().eval()
    x = torch.randn(4, 3, 8, 8)
    quantcore.prepare(m, {"version": 1, "name": "t", "calibration": {"method": "max"}}, example_input=x)
    quantcore.calibrate(m, [x])
    from quantcore.export.onnx_qdq import ExportError

    with pytest.raises(ExportError, match=r"operator aten::col2im; a later --opset \(18..21\)"):
        quantcore.api.export(m, str(tmp_path / "o"), "onnx", example_input=x[:1])


def test_timm_ft2_exports_and_names_onnxruntimes_softmax_kernel(tmp_path):
    """The default timm ViT under ft2 was refused ('4-bit symmetric activations into QLinearConv': none
    there): unoptimized onnxruntime computes the graph exactly; its fused QLinearSoftmax does not."""
    m = _vit(True)
    x = torch.randn(4, 3, 32, 32)
    quantcore.prepare(m, FT2, example_input=x)
    quantcore.calibrate(m, [x])
    rep = quantcore.api.export(m, str(tmp_path / "o"), "onnx", example_input=x[:1])
    assert rep["smoke"]["max_abs_logit_diff_unoptimized"] < 1e-4
    assert any("QLinearSoftmax" in w for w in rep.get("warnings", [])), rep.get("warnings")
    assert (tmp_path / "o" / "model.onnx").exists()


def test_a_recipe_argument_the_timm_model_does_not_take_is_named():
    pytest.importorskip("timm")
    with pytest.raises(UserError, match=r"model.img_size: timm model 'resnet18' does not take 'img_size'") as e:
        quantcore.build_model({"version": 1, "name": "t", "model": {"name": "resnet18", "img_size": 32}})
    assert "Offline" not in str(e.value)


def test_an_override_naming_a_second_name_of_a_module_says_which_name_to_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.a(x))

    from quantcore.errors import PlacementError

    for rule in ({"match": "b", "float": True}, {"match": "b.input_quantizer", "spec": {"bits": 4}}):
        with pytest.raises(PlacementError, match="'b' is another name of module 'a'"):
            quantcore.prepare(Tied().eval(), {"version": 1, "name": "t", "overrides": [rule]},
                              example_input=torch.randn(2, 8))
    m = quantcore.prepare(Tied().eval(), {"version": 1, "name": "t", "overrides": [{"match": "a", "float": True}]},
                          example_input=torch.randn(2, 8))
    assert "a.input_quantizer" not in quantcore.quantizers(m)


class _InPlaceAttention(nn.Module):
    """timm's attention with q scaled in place on its view of the fused qkv output."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, t):
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        q.mul_(16 ** -0.5)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class _InPlaceScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.attn = _InPlaceAttention()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(t).mean(1))


def test_an_in_place_scaled_q_does_not_join_the_gemm_range():
    """q.mul_(scale) on a view of the fused qkv output: the shared storage changed, so none of q/k/v is
    provably the GEMM output; the old fallback shared all three on one range (q on 15 % of its grid)."""
    torch.manual_seed(0)
    m = _InPlaceScaled().eval()
    x = torch.randn(8, 3, 32, 32)
    quantcore.prepare(m, FT2, example_input=x)
    use, groups = _q_codes(m, x, "attn")
    assert not any("attn.q_quantizer" in g for g in groups), groups
    assert use > 0.9


def test_a_zero_learned_scale_in_a_half_precision_model_is_finite():
    """MIN_SCALE = 1e-8 is 0 in float16: the floor must be applied in float32."""
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 8)
    quantcore.prepare(m, {"version": 1, "name": "t", "calibration": {"method": "max"}}, example_input=x)
    quantcore.calibrate(m, [x])
    from quantcore.qat import learnable_quantizers

    learnable_quantizers(m)
    m.half()
    with torch.no_grad():
        for q in quantcore.quantizers(m).values():
            q.scale.zero_()
    y = m(x.half().requires_grad_())
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    q = quantcore.quantizers(m)["2.input_quantizer"]
    assert q.scale.grad is not None and q.scale.grad.dtype == torch.float16


def test_loading_or_finalizing_statistics_on_learned_ranges_is_refused():
    """The data-parallel calibration path (load merged statistics, finalize) was accepted on a QAT model:
    the new range was set, ignored by the forward, and overwritten by convert."""
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    quantcore.prepare(m, {"version": 1, "name": "t", "calibration": {"method": "max"}}, example_input=x)
    quantcore.calibrate(m, [x])
    state = quantcore.api.calibration_state(m)
    from quantcore.qat import learnable_quantizers

    learnable_quantizers(m)
    with pytest.raises(CalibrationError, match="learned"):
        quantcore.api.load_calibration_state(m, state)
    with pytest.raises(CalibrationError, match="learned"):
        quantcore.api.finalize(m)

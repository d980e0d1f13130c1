"""BatchNorm folding: pairs proven on the data flow of one forward, outputs preserved, BN gone; every
BatchNorm left alone has its reason."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

from quantcore.fold import FoldError, find_conv_bn_pairs, fold_batchnorm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), float((a - b).abs().max()) / scale


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pre_bn = nn.BatchNorm2d(8)  # BN *before* a conv: not foldable into it
        self.conv = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 8, 1)   # output used twice: not foldable
        self.side_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.features(x)
        x = self.conv(self.pre_bn(x))
        s = self.side(x)
        x = self.side_bn(s) + s
        return self.head(x.mean((2, 3)))


class Untraceable(nn.Module):
    """Shape-dependent control flow (as timm's MobileViT block) makes fx tracing fail."""

    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.swapped = swapped

    def forward(self, x):
        if math.ceil(x.shape[-1] / 2) > 1:
            if self.swapped:  # declared conv, bn but applies bn first: declaration order lies
                return self.conv(self.bn(x))
            return self.bn(self.conv(x))
        return x


def test_small_net_pairs_reasons_and_outputs():
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    res = fold_batchnorm(model, example_input=x)
    assert res.pairs == [("features.0", "features.1"), ("features.3", "features.4")]
    assert "not the direct output of a convolution" in res.unfolded["pre_bn"]
    assert "also read by" in res.unfolded["side_bn"]
    assert isinstance(model.features[1], nn.Identity) and isinstance(model.features[4], nn.Identity)
    assert model.features[0].bias is not None  # bias added where the conv had none
    assert bn_names(model) == ["pre_bn", "side_bn"]
    assert_close(outputs(model, x), outputs(ref, x))


def test_training_mode_raises():
    model = SmallNet().train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FoldError, match="eval mode"):
        fold_batchnorm(model, x)
    model.eval()
    model.features[1].train()
    with pytest.raises(FoldError, match="features.1"):
        fold_batchnorm(model, x)
    with pytest.raises(FoldError, match="example input"):
        fold_batchnorm(model.eval(), None)


def test_untraceable_block_folds_on_data_flow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Untraceable(), nn.BatchNorm2d(4)).eval()
    randomize_bn(model)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    res = fold_batchnorm(model, example_input=x)
    assert res.pairs == [("1.conv", "1.bn")]
    assert_close(outputs(model, x), outputs(ref, x))
    assert bn_names(model) == ["2"]  # Untraceable sits between conv 0 and BN 2
    assert "not the direct output" in res.unfolded["2"]


def test_declared_conv_bn_applied_in_another_order_is_not_folded():
    """Declaration order lies: (conv, bn) declared, bn applied first. Nothing is folded, nothing changes."""
    torch.manual_seed(0)
    model = nn.Sequential(Untraceable(swapped=True)).eval()
    randomize_bn(model)
    x = torch.randn(2, 4, 6, 6)
    before = outputs(model, x)
    res = fold_batchnorm(model, example_input=x)
    assert res.pairs == [] and "0.bn" in res.unfolded
    assert isinstance(model[0].bn, nn.BatchNorm2d)
    assert torch.equal(outputs(model, x), before)


class ConvReluBn(nn.Module):
    """Declared (conv, bn), computes conv -> ReLU -> bn behind a shape-dependent branch (no fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] % 2 == 0:
            y = torch.relu(y)
        return self.bn(y)


def test_conv_relu_bn_is_not_folded_through_the_relu():
    from quantcore import prepare

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(ConvReluBn())).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    recipe = {"model": {"name": "x"}, "placement": {"family": "generic", "fold_bn": True}}
    prepare(model, recipe, example_input=x)
    pl = model.quantcore_placement
    assert pl.folded_bn == [] and "not the direct output" in pl.unfolded_bn["0.bn"]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # nothing calibrated: the FP32 path is untouched


def test_generic_family_folds_plain_conv_bn():
    from quantcore import prepare

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    prepare(model, {"model": {"name": "x"}, "placement": {"family": "generic", "fold_bn": True}}, example_input=x)
    assert model.quantcore_placement.folded_bn == [("0", "1")] and isinstance(model[1], nn.Identity)
    with torch.no_grad():
        assert_close(model(x), ref(x))


def test_resnext50_fold():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnext50_32x4d(weights=None)).eval()
    n_bn = len(bn_names(model))
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    pairs = fold_batchnorm(model, example_input=x).pairs
    assert len(pairs) == n_bn == 53
    assert ("layer1.0.conv1", "layer1.0.bn1") in pairs and ("layer1.0.downsample.0", "layer1.0.downsample.1") in pairs
    assert bn_names(model) == []
    assert_close(outputs(model, x), outputs(ref, x))


def test_mobilevit_fold_keeps_activations():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilevit_xxs", pretrained=False)).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    act_type = type(model.stem.bn.act)
    res = fold_batchnorm(model, example_input=x)
    pairs = res.pairs
    assert res.unfolded == {}
    assert ("stem.conv", "stem.bn") in pairs
    # MobileViT blocks do not trace; their ConvNormAct children still fold.
    assert ("stages.2.1.conv_kxk.conv", "stages.2.1.conv_kxk.bn") in pairs
    assert bn_names(model) == []
    assert isinstance(model.stem.bn, nn.Sequential) and isinstance(model.stem.bn.act, act_type)
    assert_close(outputs(model, x), outputs(ref, x))


def test_find_pairs_does_not_modify():
    model = SmallNet().eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    res = find_conv_bn_pairs(model, torch.randn(1, 3, 8, 8))
    assert res.pairs == [("features.0", "features.1"), ("features.3", "features.4")]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


class _TiedConvs(nn.Module):
    """Two convs holding one weight parameter, each followed by its own BatchNorm, plus a plain pair."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_c(self.c(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def test_a_conv_with_a_tied_weight_is_left_unfolded_with_the_reason():
    """Folding rescales a conv's weight: with the weight shared by another conv (each with its own
    BatchNorm) both would change. Those pairs stay, named; the rest of the model still folds (it
    failed as a whole on the output check)."""
    res = _fold_keeping_outputs(_TiedConvs)
    assert res.pairs == [("c", "bn_c")]
    assert all("shares its weight" in res.unfolded[n] for n in ("bn_a", "bn_b")), res.unfolded


def _fold_keeping_outputs(net_class: type):
    """``fold_batchnorm`` on ``net_class()`` (built under seed 0, BatchNorm statistics randomized) on a
    2x3x8x8 input; its outputs must be the unfolded model's. Returns the fold result."""
    torch.manual_seed(0)
    model = randomize_bn(net_class()).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    res = fold_batchnorm(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    return res


class _ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.b1, self.b2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.d, self.bn_d = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)), nn.BatchNorm2d(8)
        self.e, self.bn_e = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.b1(self.c(x)).relu() + self.b2(self.c(x.flip(-1))).relu()
        return self.bn_e(self.e(self.bn_d(self.d(y)).relu()))


def test_an_unfolded_batchnorm_after_a_conv_says_why_that_conv_cannot_take_it():
    """helper-133: a conv called twice (one BatchNorm per call) and a weight-normalized conv left their
    BatchNorms unfolded, rightly, 'because the input is not the direct output of a convolution'."""
    res = _fold_keeping_outputs(_ConvCalledTwice)
    assert res.pairs == [("e", "bn_e")]
    for bn in ("b1", "b2"):
        assert "its conv 'c' is called 2 times" in res.unfolded[bn], res.unfolded
    assert "its conv 'd' computes its weight in forward" in res.unfolded["bn_d"], res.unfolded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_folds_within_its_own_precision(dtype):
    """fp16/bf16 CNNs fold: the check allows the dtype's rounding (8 epsilons) and no more; the folded
    weights are rounded once from float64. Independent check: the folded half model against the
    unfolded one in float64 is as close as the unfolded half model itself is."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    exact = outputs(copy.deepcopy(model).double(), x.double())
    half = copy.deepcopy(model).to(dtype)
    own = (outputs(half, x.to(dtype)).double() - exact).abs().max()
    res = fold_batchnorm(half, example_input=x.to(dtype))
    assert len(res.pairs) == 20 and not bn_names(half)
    folded = (outputs(half, x.to(dtype)).double() - exact).abs().max()
    assert folded <= 3 * own, (float(folded), float(own))


def test_a_model_whose_output_is_not_finite_is_refused_with_the_reason():
    class LogNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.log(self.bn(self.conv(x)).mean((2, 3)))  # log of negatives: NaN

    model = randomize_bn(LogNet()).eval()
    with pytest.raises(FoldError, match="NaN or inf before any folding.*fold_bn: false"):
        fold_batchnorm(model, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model.bn, nn.BatchNorm2d)  # nothing changed


class _ReadsOutsideTheDataFlow(nn.Module):
    """Three conv+BN pairs: ``a`` is plain; ``b``'s BatchNorm parameters are read outside its forward
    (NAM-style channel attention); ``c``'s conv weight is reused by another op (TridentNet-style
    dilated branch). The probe cannot see the last two reads."""

    def __init__(self):
        super().__init__()
        self.ca, self.ba = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.cb, self.bb = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.cc, self.bc = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.ba(self.ca(x)))
        z = self.bb(self.cb(y))
        w = self.bb.weight.abs() / self.bb.weight.abs().sum()
        z = torch.sigmoid(z * w.view(1, -1, 1, 1)) * z
        t = self.bc(self.cc(z)) + nn.functional.conv2d(z, self.cc.weight, padding=2, dilation=2)
        return t.mean((2, 3))


def test_pairs_read_outside_the_data_flow_stay_unfolded_with_the_reason_and_the_rest_fold():
    """Before: the check forward failed (a BatchNorm read after it became Identity) and the model was
    left half-folded with advice about the example input, or one reused conv weight refused folding
    for the whole model. Now each pair is tried alone: the others fold, these two are listed."""
    torch.manual_seed(0)
    model = randomize_bn(_ReadsOutsideTheDataFlow()).eval()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    res = fold_batchnorm(model, x)
    assert res.pairs == [("ca", "ba")]
    assert "fails once it is folded" in res.unfolded["bb"], res.unfolded
    assert "changed the model's outputs" in res.unfolded["bc"], res.unfolded
    assert isinstance(model.bb, nn.BatchNorm2d) and isinstance(model.bc, nn.BatchNorm2d)
    assert torch.equal(model.cb.weight, ref_model.cb.weight) and torch.equal(model.cc.weight, ref_model.cc.weight)
    with torch.no_grad():
        assert_close(model(x), ref_model(x))
    res.undo()
    with torch.no_grad():
        assert torch.equal(model(x), ref_model(x))


def test_timm_frozen_batchnorm_act_is_folded():
    """timm.layers.freeze_batch_norm_2d turns BatchNormAct2d into FrozenBatchNormAct2d (frozen
    backbones): those were neither folded nor listed, and the model's family fell to 'generic'."""
    from timm.layers import freeze_batch_norm_2d
    from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 4, 1), BatchNormAct2d(4, apply_act=False))
    randomize_bn(model)
    model = freeze_batch_norm_2d(model).eval()
    assert isinstance(model[1], FrozenBatchNormAct2d)
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 10, 10)
    res = fold_batchnorm(model, x)
    assert res.pairs == [("0", "1"), ("2", "3")] and not res.unfolded
    assert not any(isinstance(m, FrozenBatchNormAct2d) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x), ref_model(x))


def test_float32_rounding_is_no_reason_to_refuse_a_fold_but_a_real_change_still_is():
    """Folding rounds the folded weights once; a deep model amplified that past the float32 tolerance
    (HF LeViT: four chained folds, 2e-5 of the output scale) and prepare refused a correct fold. A
    mismatch is now judged on a float64 copy: a tolerance far below float32 rounding still folds, while
    a BatchNorm read outside the data flow stays unfolded."""
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    res = fold_batchnorm(model, example_input=x, rtol=1e-12, atol=1e-12)  # below float32's own rounding
    assert res.pairs == [("features.0", "features.1"), ("features.3", "features.4")]
    assert_close(outputs(model, x), outputs(ref, x))

    class Peek(nn.Module):  # reads its conv's weight outside the data flow
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv.weight.mean()

    torch.manual_seed(0)
    peek = randomize_bn(Peek()).eval()
    res = fold_batchnorm(peek, example_input=x, rtol=1e-12, atol=1e-12)
    assert res.pairs == [] and "bn" in res.unfolded and "beyond the relative tolerance" in res.unfolded["bn"]


def test_load_folds_what_the_checkpoint_recorded_whatever_the_placeholder_weights_say(tmp_path, monkeypatch):
    """load() rebuilds the model with placeholder weights and re-ran the weight-dependent fold check
    on them: a check that failed there left BatchNorms unfolded, and the checkpoint's folded state no
    longer fit (missing batch_norm keys, unexpected conv biases). The folds are recorded and replayed."""
    import quantcore

    r = quantcore.load_recipe({"name": "cnn", "model": {"name": "resnet10t", "source": "timm", "in_chans": 1,
                                                        "num_classes": 10},
                               "calibration": {"method": "max", "num_batches": 1}})
    torch.manual_seed(0)
    m = quantcore.prepare(quantcore.build_model(r, load_weights=False), r)
    folded = list(m.quantcore_placement.folded_bn)
    assert folded
    quantcore.calibrate(m, [torch.randn(2, 1, 32, 32)])
    quantcore.save(m, str(tmp_path / "m.qc.pt"))
    # on the placeholder weights every check fails, as it did on HF LeViT's random ones
    with monkeypatch.context() as mp:
        mp.setattr(torch, "allclose", lambda *a, **k: False)
        back = quantcore.load(str(tmp_path / "m.qc.pt"))
    assert [tuple(p) for p in back.quantcore_placement.folded_bn] == [tuple(p) for p in folded]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    # a checkpoint written before the folds were recorded: the BatchNorms its state lacks were folded
    from quantcore.checkpoint import checkpoint_bytes, read_checkpoint

    meta, _ = read_checkpoint((tmp_path / "m.qc.pt").read_bytes(), "m")
    del meta["folded_bn"]
    (tmp_path / "old.qc.pt").write_bytes(checkpoint_bytes(m, meta))
    with monkeypatch.context() as mp:
        mp.setattr(torch, "allclose", lambda *a, **k: False)
        old = quantcore.load(str(tmp_path / "old.qc.pt"))
    assert [tuple(p) for p in old.quantcore_placement.folded_bn] == [tuple(p) for p in folded]
    with torch.no_grad():
        assert torch.equal(old(x), m(x))


@pytest.mark.parametrize("hooked", [0, 1])
def test_a_conv_or_batchnorm_with_forward_hooks_is_left_unfolded_with_the_reason(hooked):
    """A user's feature-extractor hook that stores its output let the pair fold: the BatchNorm's hook
    then never fired (an Identity took its place) and the conv's saw the BatchNorm's output, silently."""
    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                   nn.BatchNorm2d(4))).eval()
    seen = {}
    m[hooked].register_forward_hook(lambda mod, i, o: seen.__setitem__("x", o))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        m(x)
    before = seen.pop("x").clone()
    res = fold_batchnorm(m, x)
    assert res.pairs == [("3", "4")] and "'%d' has forward hooks" % hooked in res.unfolded["1"]
    with torch.no_grad():
        m(x)
    torch.testing.assert_close(seen["x"], before, rtol=0, atol=0)  # the hook sees what it saw before

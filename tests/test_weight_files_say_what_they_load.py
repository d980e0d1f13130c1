"""FP32 weights: the model holds what the recipe's file says, or the recipe is refused by field
(2026-12-03 break pass; each test failed on the code before its fix)."""
from __future__ import annotations

import pytest
import torch

import quantcore
from quantcore.models import ModelError


def _timm_vit(**kw):
    return {"name": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 10,
            "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}, **kw}


@pytest.fixture()
def two_sets(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    a = quantcore.build_model({"version": 1, "name": "a", "model": _timm_vit()}).state_dict()
    b = {k: v + 0.5 if v.is_floating_point() else v for k, v in a.items()}
    path = tmp_path / "train_ckpt.pt"
    torch.save({"model": a, "model_ema": b, "epoch": 3}, path)
    return path, a


def test_a_pretrained_file_with_ema_weights_is_not_loaded_as_other_weights_than_checkpoint(two_sets):
    """timm's loader prefers 'model_ema': model.pretrained_file gave the EMA weights where
    model.checkpoint gives the main ones, and the check compared the main ones to nothing."""
    path, a = two_sets
    m = quantcore.build_model({"version": 1, "name": "c", "model": _timm_vit(checkpoint=str(path))})
    assert all(torch.equal(m.state_dict()[k], v) for k, v in a.items())
    with pytest.raises(ModelError, match="EMA weights.*model.checkpoint"):
        quantcore.build_model({"version": 1, "name": "p", "model": _timm_vit(pretrained_file=str(path))})


def test_integer_tensors_for_float_weights_are_refused(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    sd = quantcore.build_model({"version": 1, "name": "a", "model": _timm_vit()}).state_dict()
    path = tmp_path / "i8.pt"
    torch.save({k: (v * 20).to(torch.int8) for k, v in sd.items()}, path)
    for field in ("checkpoint", "pretrained_file"):
        with pytest.raises(ModelError, match=rf"model.{field} .*torch.int8 in the file"):
            quantcore.build_model({"version": 1, "name": "i", "model": _timm_vit(**{field: str(path)})})


def test_fields_a_source_does_not_use_are_refused_not_ignored(tmp_path, s3_server, s3_bucket):
    torch.save({}, tmp_path / "w.pt")
    cases = [({"name": "torchvision:resnet18", "pretrained_file": str(tmp_path / "w.pt")}, "model.pretrained_file"),
             ({"name": "torchvision:resnet18", "img_size": 64}, "model.img_size"),
             ({"name": "torchvision:resnet18", "in_chans": 1}, "model.in_chans"),
             # an argument the builder does not take: named, not "Offline?" (nothing was downloaded)
             ({"name": "torchvision:resnet18", "kwargs": {"image_size": 64}},
              r"^model.kwargs.image_size: torchvision model 'resnet18' does not take 'image_size'"),
             ({"name": "quantcore/vit_fmnist", "pretrained_file": str(tmp_path / "w.pt")}, "model.pretrained_file"),
             (_timm_vit(pretrained_file=f"s3://{s3_bucket}/w.pt"), "timm reads local files only"),
             (_timm_vit(pretrained_file=str(tmp_path / "missing.pt")), "not found"),
             (_timm_vit(pretrained_file=str(tmp_path)), "a directory")]
    for model, needle in cases:
        with pytest.raises(ModelError, match=needle):
            quantcore.build_model({"version": 1, "name": "t", "model": model})


def test_checkpoint_and_pretrained_file_together_are_refused(tmp_path):
    """Both name the FP32 weights; model.checkpoint was loaded and pretrained_file never opened."""
    from quantcore.errors import UserError

    with pytest.raises(UserError, match="model.checkpoint .* and model.pretrained_file .* both give the weights"):
        quantcore.build_model({"version": 1, "name": "b", "model": _timm_vit(checkpoint=str(tmp_path / "a.pt"),
                                                                             pretrained_file=str(tmp_path / "b.pt"))})


class _Holder(torch.nn.Module):
    """A model whose every parameter sits under a submodule called ``module``, like a DDP wrapper's."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(3, 2)


def test_wrapper_prefixes_are_removed_and_a_submodule_called_module_is_not(tmp_path):
    """torch.compile saves '_orig_mod.<name>', DDP over compile 'module._orig_mod.<name>': both were refused
    as missing every tensor. A model's own 'module.' names must load as they are."""
    from quantcore.models import load_state_dict_uri

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for prefix in ("_orig_mod.", "module._orig_mod.", "module."):
        torch.save({prefix + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
        dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        load_state_dict_uri(dst, str(tmp_path / "w.pt"))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items()), prefix
    holder = _Holder()
    torch.save(holder.state_dict(), tmp_path / "h.pt")
    again = _Holder()
    load_state_dict_uri(again, str(tmp_path / "h.pt"))
    assert torch.equal(again.module.weight, holder.module.weight)


def test_a_lightning_style_prefix_is_removed_only_when_it_holds_exactly_the_model(tmp_path):
    """A LightningModule saves its network as 'model.<name>' (or 'net.', ...) under 'state_dict': it was
    refused as missing every tensor with no hint, where DDP's 'module.' was removed. Removed now when
    every name carries one prefix and the rest are the model's names; a file that also holds other
    tensors (a teacher, a loss buffer) is refused, naming the prefix and what else it holds."""
    from quantcore.models import load_state_dict_uri

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for prefix in ("model.", "net."):
        torch.save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 2},
                   tmp_path / "l.ckpt")
        dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        load_state_dict_uri(dst, str(tmp_path / "l.ckpt"))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items()), prefix
    for prefix in ("model._orig_mod.", "model.module."):  # Lightning around torch.compile / DDP names
        torch.save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}}, tmp_path / "c.ckpt")
        dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        load_state_dict_uri(dst, str(tmp_path / "c.ckpt"))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items()), prefix
    extra = {**{"model." + k: v for k, v in src.state_dict().items()}, "criterion.weight": torch.ones(2)}
    torch.save({"state_dict": extra}, tmp_path / "x.ckpt")
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ModelError, match=r"names under 'model\.' are exactly the model's.*1 other tensor.*criterion"):
        load_state_dict_uri(dst, str(tmp_path / "x.ckpt"))
    # a prefix under which only some of the model's names are: refused as before (missing tensors)
    torch.save({"model.0.weight": src[0].weight}, tmp_path / "part.pt")
    with pytest.raises(ModelError, match="missing"):
        load_state_dict_uri(dst, str(tmp_path / "part.pt"))


def test_a_pickled_module_is_refused_naming_the_class_in_one_sentence(tmp_path):
    """torch's own text advises add_safe_globals (loading code) and was cut mid-word at 200 characters."""
    from quantcore.models import load_state_dict_uri

    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(ModelError) as err:
        load_state_dict_uri(torch.nn.Linear(2, 2), str(tmp_path / "whole.pt"))
    msg = str(err.value)
    assert "whole.pt" in msg and "it holds a pickled torch.nn.modules.linear.Linear)" in msg, msg
    assert "add_safe_globals" not in msg and "pickled objects are refused" in msg, msg
    # a Lightning checkpoint whose hyper-parameters hold a Path: the way out is said
    import pathlib

    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "hyper_parameters": {"root": pathlib.Path("/d")}},
               tmp_path / "l.ckpt")
    with pytest.raises(ModelError, match=r"a pickled pathlib\.PosixPath\).*torch\.save\(ckpt\['state_dict'\]"):
        load_state_dict_uri(torch.nn.Linear(2, 2), str(tmp_path / "l.ckpt"))


def test_a_training_checkpoint_without_a_known_key_names_what_it_holds(tmp_path):
    lin = torch.nn.Linear(3, 2)
    torch.save({"state_dict_ema": lin.state_dict(), "epoch": 4}, tmp_path / "ema.pt")
    from quantcore.models import load_state_dict_uri

    with pytest.raises(ModelError, match=r"holds \['state_dict_ema'\].*torch.save\(ckpt\['state_dict_ema'\]"):
        load_state_dict_uri(torch.nn.Linear(3, 2), str(tmp_path / "ema.pt"))


def test_half_precision_weights_say_they_were_cast(tmp_path):
    """A float16 file loads into the FP32 model; the weights' provenance (in every report) now says so."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    sd = quantcore.build_model({"version": 1, "name": "a", "model": _timm_vit()}).state_dict()
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "h.pt")
    torch.save(sd, tmp_path / "f.pt")
    for field in ("checkpoint", "pretrained_file"):
        m = quantcore.build_model({"version": 1, "name": "h", "model": _timm_vit(**{field: str(tmp_path / "h.pt")})})
        assert m.quantcore_weights.endswith("(float16 values, cast to float32)"), m.quantcore_weights
        m = quantcore.build_model({"version": 1, "name": "f", "model": _timm_vit(**{field: str(tmp_path / "f.pt")})})
        assert m.quantcore_weights == f"model.{field} {tmp_path / 'f.pt'}"


def test_a_run_directory_given_as_checkpoint_names_its_model_qc_pt(tmp_path):
    from quantcore.checkpoint import CheckpointError

    torch.manual_seed(0)
    recipe = {"version": 1, "name": "d", "model": {"name": "quantcore/vit_fmnist"}}
    model = quantcore.prepare(quantcore.build_model(recipe), recipe)
    quantcore.calibrate(model, [torch.randn(4, 1, 28, 28)])
    quantcore.save(model, str(tmp_path / "run" / "model.qc.pt"))
    with pytest.raises(CheckpointError, match=r"a directory, not a checkpoint file; the calibrated checkpoint in it "
                                              r"is .*run/model.qc.pt"):
        quantcore.load(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*nothere: not found$"):
        quantcore.load(str(tmp_path / "nothere"))


@pytest.mark.parametrize("kind,field,value,needle", [
    ("vit", "image_std", None, r"image_std is null while the processor normalizes"),
    ("vit", "image_mean", None, r"image_mean is null while the processor normalizes"),
    ("vit", "image_mean", "0.5", r"image_mean '0.5' is not a number or a flat list"),
    ("vit", "image_mean", [[0.5], [0.5], [0.5]], r"image_mean .*0.5\], \[0.5.* is not a number or a flat list"),
    ("vit", "rescale_factor", None, r"rescale_factor None is not a number"),
    ("vit", "resample", None, r"resample None is not a PIL resampling code"),
    ("vit", "size", {"height": "a", "width": 32}, r"size .* is not a positive integer or a mapping"),
    ("convnext", "crop_pct", 0, r"crop_pct 0 must be positive"),
])
def test_malformed_image_processor_fields_are_named_not_replaced_or_a_traceback(tmp_path, kind, field, value,
                                                                                 needle):
    """A null image_std became 0.5 (the processor itself refuses it); other malformed fields crashed with
    TypeError/ValueError/ZeroDivisionError tracebacks. (2026-12-03 break pass)"""
    import json

    import transformers as T

    from quantcore.model_sources.hf import hf_data_config

    if kind == "vit":
        config, proc = T.ViTConfig(image_size=32, num_labels=3), T.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        config, proc = T.ConvNextConfig(image_size=56, num_labels=3), T.ConvNextImageProcessor(
            size={"shortest_edge": 56}, crop_pct=0.875)
    proc.save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=needle):
        hf_data_config(str(tmp_path), str(tmp_path), config, None)

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
             ({"name": "quantcore/vit_fmnist", "pretrained_file": str(tmp_path / "w.pt")}, "model.pretrained_file"),
             (_timm_vit(pretrained_file=f"s3://{s3_bucket}/w.pt"), "timm reads local files only"),
             (_timm_vit(pretrained_file=str(tmp_path / "missing.pt")), "not found"),
             (_timm_vit(pretrained_file=str(tmp_path)), "a directory")]
    for model, needle in cases:
        with pytest.raises(ModelError, match=needle):
            quantcore.build_model({"version": 1, "name": "t", "model": model})

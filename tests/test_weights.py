"""weights.py: a checkpoint keeps the network's, the loss's and inference's settings apart, each from its own flags;
checkpoints written before they were apart (one flat config) still load, to the same detections."""
import dataclasses
import os

import pytest
import torch

import data as D
import model as M
import weights as W
from conftest import run
from loss import LossConfig


def test_a_checkpoint_holds_the_three_configs_each_from_its_own_flags(tiny_shapes, tmp_path):
    out = str(tmp_path / "run")
    run(tiny_shapes, out, iters=1, gamma="1", alpha="none", ohem="3", **{"box-loss": "l1", "no-eval": True})
    path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["config"]) == {f.name for f in dataclasses.fields(M.ModelConfig)}  # the network's alone
    assert W.load_loss_config(path) == LossConfig(alpha=None, gamma=1.0, box_loss="l1", ohem_ratio=3.0)
    model = W.load_checkpoint(path)
    assert model.inference == M.InferenceConfig() and model.cfg.anchor_sizes == (16, 32, 64, 128, 256)
    assert W.load_loss_config("torchvision") == W.torchvision_loss(1) == LossConfig(box_loss="l1")  # its L1 loss


def test_a_checkpoint_written_before_the_configs_were_apart_loads_and_detects_the_same(tiny_checkpoint, tiny_shapes,
                                                                                        tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    flat = {**ckpt["config"], **ckpt["loss"], **ckpt["inference"], "score_thresh": 0.1, "gamma": 0.0}
    old = {k: v for k, v in ckpt.items() if k not in ("loss", "inference")} | {"config": flat}
    torch.save(old, tmp_path / "old.pt")  # the layout of checkpoints before issue 33: one "config" of 34 fields
    before, after = W.load_checkpoint(tiny_checkpoint), W.load_checkpoint(str(tmp_path / "old.pt"))
    assert after.cfg == before.cfg and after.inference == M.InferenceConfig(score_thresh=0.1)
    assert W.load_loss_config(str(tmp_path / "old.pt")) == dataclasses.replace(LossConfig(**ckpt["loss"]), gamma=0.0)
    val = D.CocoDetection(*D.coco_paths(tiny_shapes, "val"))
    images = [val[i][0] for i in range(len(val))]
    expected = M.detect(before, images, score_thresh=0.1)
    got = M.detect(after, images)  # its own score threshold, 0.1
    assert sum(len(d["boxes"]) for d in got) > 0
    for e, g in zip(expected, got):
        for k in e:
            assert torch.equal(e[k], g[k]), k


def test_a_config_of_unknown_fields_is_refused_naming_the_file(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "no_such_field": 1}}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"future.pt: its configs are not this project's .*no_such_field"):
        W.load_checkpoint(str(tmp_path / "future.pt"))
    flat = {k: v for k, v in ckpt.items() if k not in ("loss", "inference")}
    torch.save({**flat, "config": {**ckpt["config"], "no_such_field": 1}}, tmp_path / "old_future.pt")
    with pytest.raises(ValueError, match=r"old_future.pt: its configs are not this project's .*no_such_field"):
        W.load_checkpoint(str(tmp_path / "old_future.pt"))

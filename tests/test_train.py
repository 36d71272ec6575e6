"""train.py: a step trains, a few dozen overfit, resume is exact, DDP equals one process, faults stop cleanly."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

import data as D
import model as M
import train
from conftest import ROOT, read_metrics, run, tiny_flags


def test_one_step_changes_the_weights_and_gives_finite_losses(tiny_shapes, tmp_path):
    out = str(tmp_path / "run")
    torch.manual_seed(0)
    before = run(tiny_shapes, out, iters=0, **{"no-eval": True})["model"].state_dict()
    before = {k: v.clone() for k, v in before.items()}
    after = run(tiny_shapes, out, iters=1, **{"no-eval": True})["model"].state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "cls_head.out.weight" in changed and "backbone.layer1.0.conv1.weight" in changed
    row = read_metrics(out)[0]
    assert math.isfinite(row["cls"]) and math.isfinite(row["box"]) and row["cls"] > 0


def test_a_few_dozen_steps_overfit_two_images(tmp_path):
    shapes = D.make_shapes(str(tmp_path / "two"), num_train=2, num_val=1, size=96, seed=3)
    ann, images = D.coco_paths(shapes, "train")
    result = run(shapes, str(tmp_path / "run"), iters=60,  # no flips: the two images exactly, as often as it takes
                 **{"val-ann": ann, "val-images": images, "lr": "0.05", "flip": "0", "warmup-iters": "10"})
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run"))]
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5
    assert result["stats"]["AP50"] >= 0.9


def test_resume_reproduces_the_uninterrupted_run(tiny_shapes, tmp_path):
    straight = run(tiny_shapes, str(tmp_path / "a"), iters=6, **{"no-eval": True})["model"].state_dict()
    run(tiny_shapes, str(tmp_path / "b"), iters=3, **{"no-eval": True})  # "interrupted" after 3 iterations
    resumed = run(tiny_shapes, str(tmp_path / "b"), iters=6, resume=True, **{"no-eval": True})["model"].state_dict()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)
    losses_b = [r["loss"] for r in read_metrics(str(tmp_path / "b"))]
    assert losses_b == [r["loss"] for r in read_metrics(str(tmp_path / "a"))]


def test_torchrun_two_processes_equal_one_process_with_the_same_total_batch(tiny_shapes, tmp_path):
    same = {"norm": "frozen", "batch-size": "4", "no-eval": True}  # frozen BN: no per-process batch statistics
    flags = tiny_flags(tiny_shapes, str(tmp_path / "ddp"), iters=3, **same)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "tests", "ddp_worker.py"), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = run(tiny_shapes, str(tmp_path / "init"), iters=0, **same)["model"].state_dict()
    init = {k: v.clone() for k, v in init.items()}
    single = run(tiny_shapes, str(tmp_path / "one"), iters=3, **same)
    for k, v in single["model"].state_dict().items():
        assert torch.equal(rank0[k], rank1[k]), k
        # the runs differ by float summation order only: ~1e-5 of the update after one step, growing
        # chaotically with momentum to ~3e-3 after three
        update = (v - init[k]).norm()
        assert (rank0[k] - v).norm() <= 1e-2 * update + 1e-7, k
    ddp_losses = [r["loss"] for r in read_metrics(str(tmp_path / "ddp"))]
    one_losses = [r["loss"] for r in read_metrics(str(tmp_path / "one"))]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    calls = []

    def poisoned(*args, **kw):
        calls.append(1)
        losses = train_loss(*args, **kw)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) == 4 else losses

    train_loss = train.retinanet_loss
    monkeypatch.setattr(train, "retinanet_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss is nan.*checkpoint\.pt \(iteration 2\)"):
        run(tiny_shapes, out, iters=10, **{"ckpt-every": "2"})
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_kill_9_then_resume_continues_from_an_intact_checkpoint(tiny_shapes, tmp_path):
    out = str(tmp_path / "killed")
    ckpt = os.path.join(out, "checkpoint.pt")
    flags = tiny_flags(tiny_shapes, out, iters=500, **{"ckpt-every": "1"})
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(ckpt) and len(read_metrics(out)) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    proc.wait()
    done = torch.load(ckpt, weights_only=True)["iteration"]  # the checkpoint is whole
    assert done >= 4
    result = run(tiny_shapes, out, iters=done + 2, resume=True, **{"no-eval": True})
    assert torch.load(ckpt, weights_only=True)["iteration"] == done + 2 and result["model"] is not None


def test_finetune_from_torchvision_reinitialises_only_the_class_output(tiny_shapes, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tv_state = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    monkeypatch.setattr(M, "download_state_dict", lambda url, alternative: tv_state)  # offline stand-in
    result = run(tiny_shapes, str(tmp_path / "ft"), iters=0, finetune="torchvision", **{"no-eval": True})
    model = result["model"]
    assert model.cfg.num_classes == 4 and model.cfg.class_names == tuple(D.SHAPES)
    assert model.cls_head.out.weight.shape[0] == 9 * 4
    torch.testing.assert_close(model.cls_head.out.bias, torch.full((36,), -math.log(99.0)))  # §3.3 prior
    torch.testing.assert_close(model.box_head.out.weight, tv_state["head.regression_head.bbox_reg.weight"])
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, tv_state["backbone.body.layer4.2.conv3.weight"])


def test_eval_only_gives_the_same_numbers_as_the_end_of_training(tiny_shapes, tmp_path):
    out = str(tmp_path / "ev")
    stats = run(tiny_shapes, out, iters=2)["stats"]
    ckpt = os.path.join(out, "checkpoint.pt")
    again = run(tiny_shapes, str(tmp_path / "ev2"), **{"eval-only": True, "weights": ckpt})
    assert again["stats"] == stats and os.path.exists(os.path.join(out, "eval.json"))
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(os.path.join(out, "results.json"))

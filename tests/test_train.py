"""train.py: a step trains, a few dozen overfit, resume is exact, DDP equals one process, fine-tuning, evaluation
only, the memory layout, every flag spelled out. The loop's own behaviour (faults, the log) is in test_engine.py."""
import inspect
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

import anchors as A
import data as D
import model as M
import shapes
import train
import weights as W
from conftest import ROOT, read_metrics, run, shared_path, tiny_flags
from evaluate import evaluate


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
    two = shapes.make_shapes(str(tmp_path / "two"), num_train=2, num_val=1, size=96, seed=3)
    ann, images = D.coco_paths(two, "train")
    result = run(two, str(tmp_path / "run"), iters=60,  # no flips: the two images exactly, as often as it takes
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


@pytest.mark.parametrize("norm,iters,tol", [("frozen", 3, 1e-2), ("bn", 1, 5e-2)])
def test_torchrun_two_processes_equal_one_process_with_the_same_total_batch(tiny_shapes, tmp_path, norm, iters, tol):
    # Frozen BN has no batch statistics: the runs differ by float summation order only, ~1e-5 of the
    # update after one step, growing chaotically with momentum to ~3e-3 after three. Trainable BN becomes
    # SyncBatchNorm under DDP, so 2 x 2 images normalise over the 4 one process sees: the running
    # statistics agree to ~5e-7, the weights to ~1% of one step's update (BN from scratch amplifies
    # rounding; float64 agrees to 1e-12, test_backbone.py). Plain BN under DDP was 145% and 92% off.
    same = {"norm": norm, "batch-size": "4", "no-eval": True}
    flags = tiny_flags(tiny_shapes, str(tmp_path / "ddp"), iters=iters, **same)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "tests", "ddp_worker.py"), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = run(tiny_shapes, str(tmp_path / "init"), iters=0, **same)["model"].state_dict()
    init = {k: v.clone() for k, v in init.items()}
    single = run(tiny_shapes, str(tmp_path / "one"), iters=iters, **same)
    for k, v in single["model"].state_dict().items():
        assert torch.equal(rank0[k], rank1[k]), k
        if not v.is_floating_point():  # num_batches_tracked
            assert torch.equal(rank0[k], v), k
        elif "running" in k:
            assert (rank0[k] - v).norm() <= 1e-5 * v.norm(), k
        else:
            assert (rank0[k] - v).norm() <= tol * (v - init[k]).norm() + 1e-7, k
    ddp_losses = [r["loss"] for r in read_metrics(str(tmp_path / "ddp"))]
    one_losses = [r["loss"] for r in read_metrics(str(tmp_path / "one"))]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-5)


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
    monkeypatch.setattr(W, "download_state_dict", lambda url, alternative: tv_state)  # offline stand-in
    result = run(tiny_shapes, str(tmp_path / "ft"), iters=0, finetune="torchvision", **{"no-eval": True})
    model = result["model"]
    assert model.cfg.num_classes == 4 and model.cfg.class_names == tuple(shapes.SHAPES)
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


def test_resume_reads_the_checkpoint_onto_the_cpu_whatever_the_device(tiny_shapes, tmp_path, monkeypatch):
    # On a GPU, map_location=device put the saved CPU RNG state on the GPU and set_rng_state raised.
    # Stand-in: a load mapped to the training device lands on "meta", a device that is not the CPU.
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, map_location=None, **kw: real_load(
        f, map_location="meta" if isinstance(map_location, torch.device) else map_location, **kw))
    out = str(tmp_path / "r")
    run(tiny_shapes, out, iters=2, **{"no-eval": True})
    run(tiny_shapes, out, iters=3, resume=True, **{"no-eval": True})
    assert real_load(os.path.join(out, "checkpoint.pt"), weights_only=True)["iteration"] == 3


def test_resume_with_amp_from_a_float32_run_starts_a_fresh_loss_scale(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert ckpt["scaler"] == {}  # a float32 run saves a disabled scaler's empty state
    model = W.load_checkpoint(tiny_checkpoint).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # enabled, as --amp makes it (CUDA there)
    assert W.restore(tiny_checkpoint, model, opt, sched, scaler, torch.device("cpu")) == ckpt["iteration"]
    assert scaler.get_scale() == 2.0**10
    scaler.scale(torch.ones(()))  # (initialises the scale tensor)
    scaler.update(2.0**7)  # an AMP run's scale is restored
    path = str(tmp_path / "amp.pt")
    torch.save({**ckpt, "scaler": scaler.state_dict()}, path)
    fresh = torch.amp.GradScaler("cpu")
    W.restore(path, model, opt, sched, fresh, torch.device("cpu"))
    assert fresh.get_scale() == 2.0**7


def test_auto_layout_is_channels_last_on_cuda_and_on_a_cpu_the_probes_answer():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.channels_last("auto", cuda) == (True, "--layout auto, cuda")
    assert train.channels_last("auto", cpu) == (False, "--layout auto, cpu")  # no probe (DDP): NCHW
    for nhwc in (True, False):  # no rule by ISA: engine.probe_layout times both
        got = train.channels_last("auto", cpu, probe=lambda nhwc=nhwc: (nhwc, "measured: ..."))
        assert got == (nhwc, "--layout auto, the faster here, measured: ...")
    assert train.channels_last("nchw", cuda, probe=lambda: 1 / 0) == (False, "--layout nchw")
    assert train.channels_last("nhwc", cpu, probe=lambda: 1 / 0) == (True, "--layout nhwc")


def test_autocast_is_bfloat16_on_a_cpu_where_it_is_native_and_float16_on_cuda(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for unit in ("AMX", "AVX512-BF16", None):
        monkeypatch.setattr(M, "native_bfloat16", lambda unit=unit: unit)
        dtype, why = M.autocast_choice("auto", cpu)
        assert dtype == (torch.bfloat16 if unit else None) and (unit or "not native") in why
        assert M.autocast_choice("auto", cuda)[0] is None  # the paper's GPU runs stay float32 unless asked
        assert M.autocast_choice("off", cpu)[0] is None and M.autocast_choice("on", cpu)[0] == torch.bfloat16
        assert M.autocast_choice("on", cuda)[0] == torch.float16


def test_bfloat16_is_not_native_where_the_process_is_kept_to_avx2():
    """The CPU's flags say nothing of what a process may run: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap it,
    and oneDNN then emulates bfloat16 (14x slower). Those caps must turn auto off, whatever the CPU has."""
    code = "import model; print(model.native_bfloat16())"
    for env in ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == "None", (env, out)


def test_deterministic_and_channels_last_train_as_an_nchw_run(tiny_shapes, tmp_path, monkeypatch):
    base = run(tiny_shapes, str(tmp_path / "a"), iters=2, layout="nchw", **{"no-eval": True})["model"].state_dict()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []  # cuBLAS's workspace setting as the first question to CUDA finds it: it is read once
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    try:
        det = run(tiny_shapes, str(tmp_path / "b"), iters=2, deterministic=True, layout="nchw", **{"no-eval": True})
        assert torch.are_deterministic_algorithms_enabled() and seen and seen[0] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    nhwc = run(tiny_shapes, str(tmp_path / "c"), iters=2, layout="nhwc", **{"no-eval": True})["model"]
    assert nhwc.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    losses = [[r["loss"] for r in read_metrics(str(tmp_path / x)) if "loss" in r] for x in "ac"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # the same maths: the same losses at every step
    for k, v in base.items():
        assert torch.equal(det["model"].state_dict()[k], v), k  # on a CPU the kernels were deterministic already
        # another summation order, amplified where batch norm's gradients cancel over 2 images (grows with the
        # thread count's split), after two steps at LR 0.08: close to a few 1e-3, where a wrong layout is garbage
        torch.testing.assert_close(nhwc.state_dict()[k], v, rtol=0, atol=5e-3)


def test_eval_only_scores_under_the_autocast_amp_asks_for(tiny_shapes, tiny_checkpoint, tmp_path):
    """--eval-only --amp on|off: the AP of the checkpoint's detections in bfloat16 or float32 (the README's
    comparison), each evaluate's with that autocast; the detections themselves differ (scores in low bits)."""
    ds, results = D.CocoDetection(*D.coco_paths(tiny_shapes, "val")), {}
    for amp in ("off", "on"):
        got = run(tiny_shapes, str(tmp_path / amp), **{"eval-only": True, "weights": tiny_checkpoint, "amp": amp})
        assert got["stats"] == evaluate(W.load_checkpoint(tiny_checkpoint), ds, amp=amp == "on")
        results[amp] = (tmp_path / amp / "results.json").read_text()
    assert results["on"] != results["off"]


def test_eval_only_refuses_a_model_of_other_classes_before_running_it(tiny_checkpoint, tmp_path):
    coco = shared_path("coco_val2017_subset")
    with pytest.raises(ValueError, match=r"instances_val2017.json: the model's classes are not this dataset's: "
                                         r"category 1 \('person'\) is 'ellipse'"):
        run(coco, str(tmp_path / "ev"), **{"eval-only": True, "weights": tiny_checkpoint, "val-split": "val2017"})


@pytest.mark.parametrize("local_rank,writes", [("0", True), ("1", False)])
def test_the_quick_start_set_is_written_by_each_nodes_first_process(tmp_path, monkeypatch, local_rank, writes):
    written = []
    monkeypatch.setattr(shapes, "make_shapes", written.append)
    monkeypatch.setenv("LOCAL_RANK", local_rank)  # no RANK / WORLD_SIZE: one process, told it is the node's n-th
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):  # nothing was really written
        train.main(train.get_args_parser().parse_args(["--iters", "1"]))
    assert written == (["data/shapes"] if writes else [])


def test_every_flag_is_written_out_and_the_presets_give_the_defaults():
    parser = train.get_args_parser()
    source = inspect.getsource(train.get_args_parser)
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]  # --no-x is generated
    missing = [flag for flag in flags if f'"{flag}"' not in source]
    assert len(flags) > 40 and not missing, missing
    for words, preset in (([], train.QUICKSTART), (["--data", "/coco"], train.PAPER)):
        args = train.fill_defaults(parser.parse_args(words))
        assert {k: getattr(args, k) for k in preset} == preset
    args = train.fill_defaults(parser.parse_args(["--lr", "0.5", "--steps", "10", "20", "--schedule", "2"]))
    assert args.lr == 0.5 and args.steps == [20, 40] and args.iters == 2 * train.QUICKSTART["iters"]


def test_anchor_ratios_and_scales_are_the_networks_and_saved_in_its_checkpoint(tiny_shapes, tiny_checkpoint, tmp_path):
    """--anchor-ratios / --anchor-scales: A = ratios x scales outputs a location in both subnets, the anchors
    anchors.py makes of them, kept in the checkpoint (infer.py rebuilds the network from it). With --finetune,
    the same number of anchors keeps the trained output layers; another number gets new ones (the prior's bias)."""
    out = str(tmp_path / "ratios")
    run(tiny_shapes, out, iters=1, **{"no-eval": True, "anchor-ratios": "0.125 1 8", "anchor-scales": "1 1.5"})
    model = W.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    cfg = model.cfg
    assert (cfg.anchor_ratios, cfg.anchor_scales, cfg.num_anchors) == ((0.125, 1.0, 8.0), (1.0, 1.5), 6)
    assert model.cls_head.out.weight.shape[0] == 6 * 4 and model.box_head.out.weight.shape[0] == 6 * 4
    cell = A.cell_anchors(16, (1.0, 1.5), (0.125, 1.0, 8.0))  # ratio = height / width, area (size x scale)^2
    torch.testing.assert_close(M.make_anchors(model.cfg, (96, 96))[0][:6], cell)  # P3's first location
    wh = cell[:, 2:] - cell[:, :2]
    torch.testing.assert_close(wh[:, 1] / wh[:, 0], torch.tensor([0.125, 0.125, 1, 1, 8, 8]))
    trained = W.load_checkpoint(tiny_checkpoint)
    same = run(tiny_shapes, str(tmp_path / "ft"), iters=0, finetune=tiny_checkpoint, **{
        "no-eval": True, "anchor-ratios": "0.25 1 4", "anchor-sizes": "8 16 32 64 128"})["model"]
    assert same.cfg.anchor_ratios == (0.25, 1.0, 4.0) and same.cfg.anchor_sizes == (8, 16, 32, 64, 128)
    torch.testing.assert_close(same.box_head.out.weight, trained.box_head.out.weight)
    fewer = run(tiny_shapes, str(tmp_path / "ft2"), iters=0, finetune=tiny_checkpoint, **{
        "no-eval": True, "anchor-ratios": "1"})["model"]
    assert fewer.cfg.num_anchors == 3 and fewer.box_head.out.weight.shape[0] == 3 * 4
    torch.testing.assert_close(fewer.cls_head.out.bias, torch.full((3 * 4,), -math.log(99.0)))  # §3.3
    torch.testing.assert_close(fewer.cls_head.tower[0][0].weight, trained.cls_head.tower[0][0].weight)
    assert fewer(torch.zeros(1, 3, 96, 96))[0].shape == (1, M.make_anchors(fewer.cfg, (96, 96))[0].shape[0], 4)

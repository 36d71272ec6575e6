"""tools/bench.py --quick: the whole table runs and every comparison finds equal results (no timing is asserted)."""
import json
import subprocess
import sys

import torch

from conftest import ROOT
from tools import bench, bench_pairs


def test_quick_bench_runs_and_its_equality_checks_pass(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert len(rows) == 9 and all(r["equal"] for r in rows), [r["check"] for r in rows]
    assert all(r["ours"] > 0 and r["torchvision"] > 0 for r in rows)
    assert "| training step" in proc.stdout  # the markdown table is printed


def test_loss_check_holds_under_autocast_and_catches_a_changed_weight():
    """The check behind the training rows: mixed precision (bfloat16 here, float16 on a GPU: the AMP row)
    stays within its 1e-2 (7e-4 here), and a change of our class biases fails it: 1e-3 the float32 check, 0.01
    the mixed precision one (a loss 2.5% off)."""
    tv, ours, loss_cfg = bench_pairs.make_pair((64, 64), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images, targets = [torch.rand(3, 64, 64, generator=g) for _ in range(2)], bench_pairs.random_targets(2, (64, 64), g)
    ok, message = bench_pairs.check_train_losses(tv, ours, loss_cfg, images, targets, amp=True)
    assert ok and "mixed precision" in message, message
    with torch.no_grad():
        ours.cls_head.out.bias += 1e-3
    assert not bench_pairs.check_train_losses(tv, ours, loss_cfg, images, targets)[0]
    with torch.no_grad():
        ours.cls_head.out.bias += 0.01 - 1e-3
    ok, message = bench_pairs.check_train_losses(tv, ours, loss_cfg, images, targets, amp=True)
    assert not ok and "mixed precision" in message, message


def test_cuda_device_is_made_current_with_tf32_off(monkeypatch):
    # --device cuda:1 synchronised and measured memory on cuda:0, and TF32 convs (~1e-3) failed "same detections"
    chosen, before = [], (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)

    def set_device(device):  # no GPU here: record what would be made current, refusing what torch refuses
        if torch.device(device).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer")
        chosen.append(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        assert bench.setup_device("cuda:1") == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]
        assert bench.setup_device("cuda") == torch.device("cuda:0") and chosen[-1] == torch.device("cuda:0")
        assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    assert bench.setup_device("cpu") == torch.device("cpu") and len(chosen) == 2


def test_same_detections_pairs_tied_scores_in_either_order_and_catches_a_moved_box():
    boxes = torch.tensor([[0.0, 0, 10, 10], [300, 300, 400, 420], [50, 50, 60, 60]])
    det = {"boxes": boxes, "scores": torch.tensor([0.9, 0.5, 0.5 - 1e-7]), "labels": torch.tensor([1, 2, 2])}
    swapped = {k: v[[0, 2, 1]] for k, v in det.items()}  # the tie came out of NMS the other way round
    assert bench_pairs.same_detections([det], [swapped])[0]
    moved = {**det, "boxes": boxes + torch.tensor([[0.0, 0, 0, 2e-3], [0, 0, 0, 0], [0, 0, 0, 0]])}
    rounded = {**det, "boxes": boxes + torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 1.3e-3], [0, 0, 0, 0]])}  # 420 px
    assert bench_pairs.same_detections([det], [rounded])[0]  # within 1e-3 px + 1e-6 of the coordinate
    relabelled = {**det, "labels": torch.tensor([0, 2, 2])}
    fewer = {k: v[:2] for k, v in det.items()}
    twice = {k: v[[0, 0, 2]] for k, v in det.items()}  # one detection standing in for two
    assert not any(bench_pairs.same_detections([det], [d])[0] for d in (moved, relabelled, fewer, twice))
    assert not bench_pairs.same_detections([det, det], [det])[0]

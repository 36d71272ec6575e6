"""tools/bench.py --quick: the whole table runs and every comparison finds equal results (no timing is asserted)."""
import json
import subprocess
import sys

import torch

import model as M
import weights as W
from conftest import ROOT, shared_path
from tools import bench, bench_pairs


def test_quick_bench_runs_and_its_equality_checks_pass(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    bf16 = 2 if M.native_bfloat16() else 0  # the quick start's iteration and ResNet-50 inference under bfloat16
    assert len(rows) == 9 + bf16 and all(r["equal"] is not False for r in rows), [r["check"] for r in rows]
    assert [r["check"] for r in rows if r["equal"] is None] == ["AP not checked with --quick"] * (bf16 // 2)
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


def test_the_bfloat16_row_compares_coco_ap_on_the_genuine_photos(monkeypatch):
    """The bfloat16 inference row's check, run as the full bench runs it, with a randomly initialised torchvision
    model in place of its COCO weights (offline here) at a small scale: both APs computed, their difference
    judged; and offline it says it did not check rather than pass."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    coco = shared_path("coco_val2017_subset")
    torch.manual_seed(0)
    model = W.from_torchvision(retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), 1)
    model.cfg.category_ids, model.cfg.min_size, model.cfg.max_size = tuple(range(91)), 128, 213
    runs = []
    monkeypatch.setattr(bench_pairs, "evaluate", lambda m, ds, amp: runs.append(amp) or {"AP": 0.1 + 0.01 * amp})
    monkeypatch.setattr(W, "load_torchvision", lambda version: model.eval())
    ok, message = bench_pairs.bfloat16_coco_ap(coco)
    assert ok is False and runs == [False, True] and "0.1100 (bfloat16), 0.1000 (float32)" in message
    monkeypatch.undo()
    monkeypatch.setattr(W, "load_torchvision", lambda version: model.eval())
    ok, message = bench_pairs.bfloat16_coco_ap(coco)  # the real evaluation of both, on the 20 photos: random
    assert ok and "on 20 val2017 photos" in message, message  # weights score ~0 AP either way

    def offline(version):
        raise RuntimeError("could not download https://x (offline); without internet, use a checkpoint")

    monkeypatch.setattr(W, "load_torchvision", offline)
    expected = "AP not checked: torchvision's COCO weights could not be downloaded"
    assert bench_pairs.bfloat16_coco_ap(coco) == (None, expected)

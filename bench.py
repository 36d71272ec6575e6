"""This RetinaNet against torchvision's, side by side: the same weights, the same inputs, equal results.

    python bench.py                   # the full table on this machine's CPU
    python bench.py --quick           # small inputs, one repeat: a smoke test of the whole table
    python bench.py --device cuda     # on a GPU, with AMP rows

Both models hold the same weights (ours converted with weights.from_torchvision) and torchvision's usual
fine-tuning setup: frozen batch norm, stem and res2 frozen, 80 classes. They alternate over --repeats
after a warm-up; the table gives the medians and ours / torchvision, and each row says whether the
two results agreed (losses within 1e-4 relative, the same detections, the same assignments).
Peak memory is measured in a fresh process per model. The table also goes to bench.json.
"""
import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d, box_iou, sigmoid_focal_loss

import anchors as A
import data as D
import model as M
import weights as W
from loss import focal_loss, retinanet_loss

FULL = dict(train_size=512, infer_size=(800, 1216), infer_batch=4, focal=(2, 120000, 80), match_images=8,
            match_size=(800, 1333), repeats=5, warmup=1, memory_runs=3)
QUICK = dict(train_size=256, infer_size=(320, 480), infer_batch=2, focal=(2, 20000, 80), match_images=2,
             match_size=(320, 480), repeats=1, warmup=0, memory_runs=1)


def make_pair(size, device, seed=0):
    """torchvision's retinanet_resnet50_fpn as one fine-tunes it, and ours with its weights."""
    torch.manual_seed(seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80, min_size=size[0],
                                max_size=size[1], detections_per_img=100)
    body = tv.backbone.body
    for name, bn in list(body.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):  # frozen BN with eps 0, as torchvision's COCO weights run
            frozen = FrozenBatchNorm2d(bn.num_features, eps=0.0)
            frozen.load_state_dict(bn.state_dict(), strict=False)
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, frozen)
    for m in (body.conv1, body.layer1):  # trainable_backbone_layers=3, torchvision's default
        m.requires_grad_(False)
    nn.init.constant_(tv.head.classification_head.cls_logits.bias, -2.5)  # scores > 0.05: real postprocessing
    ours = W.from_torchvision(tv.state_dict(), version=1)
    ours.cfg.min_size, ours.cfg.max_size = size
    cfg = ours.cfg

    def exact_anchors(image_list, features):  # torchvision takes P6/P7 strides as image // grid (61 px, not
        anchors = M.make_anchors(cfg, image_list.tensors.shape[-2:], features[0].device)[0]  # 64, at 800 px)
        return [anchors] * len(image_list.image_sizes)

    tv.anchor_generator.forward = exact_anchors  # the same anchors for both, so detections can be compared
    return tv.to(device), ours.to(device)


def random_targets(n, size, g, num_classes=80, low=2, high=8):
    out = []
    for _ in range(n):
        m = int(torch.randint(low, high + 1, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * torch.tensor([size[1], size[0]]) * 0.7
        wh = (torch.rand(m, 2, generator=g) * 0.25 + 0.05) * torch.tensor([size[1], size[0]])
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(num_classes, (m,), generator=g)})
    return out


def race(a, b, repeats, warmup, device):
    """Median seconds of a() and b(), alternating after warm-up."""
    times = {a: [], b: []}
    for i in range(warmup + repeats):
        for fn in (a, b):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[a]), statistics.median(times[b])


def train_steps(tv, ours, images, targets, amp=False):
    """One SGD step of each: forward, loss, backward, step (the same preprocessing as torchvision's)."""
    dev = images[0].device
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            for m in (tv, ours)]
    tv.train()
    ours.train()

    def tv_step():
        with torch.autocast(dev.type, enabled=amp):
            losses = tv(images, targets)
        opts[0].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opts[0].step()
        return losses

    def our_step():
        batch, _ = M.preprocess(images, ours.cfg)
        with torch.autocast(dev.type, enabled=amp):
            cls_logits, box_deltas = ours(batch)
        anchors, _ = M.make_anchors(ours.cfg, batch.shape[-2:], dev)
        losses = retinanet_loss(cls_logits, box_deltas, anchors, [t["boxes"] for t in targets],
                                [t["labels"] for t in targets], **ours.cfg.loss_args())
        opts[1].zero_grad(set_to_none=True)
        (losses["cls"] + losses["box"]).backward()
        opts[1].step()
        return losses

    return tv_step, our_step


def check_train_losses(tv, ours, images, targets, amp=False):
    """torchvision divides each image's loss by its own foreground count and averages the images; ours
    divides the batch by all of them (Detectron). Fed one image at a time, the two must agree: within
    1e-4 relative in float32, within 1e-2 under autocast (each model rounds its own way to 16 bits)."""
    worst, tol, dev = 0.0, 1e-2 if amp else 1e-4, images[0].device.type
    for img, tgt in zip(images, targets):
        with torch.no_grad(), torch.autocast(dev, enabled=amp):
            tv.train()
            expected = tv([img], [tgt])
            batch, _ = M.preprocess([img], ours.cfg)
            cls_logits, box_deltas = ours(batch)
            anchors, _ = M.make_anchors(ours.cfg, batch.shape[-2:], img.device)
            got = retinanet_loss(cls_logits, box_deltas, anchors, [tgt["boxes"]], [tgt["labels"]],
                                 **ours.cfg.loss_args())
        for a, b in ((got["cls"], expected["classification"]), (got["box"], expected["bbox_regression"])):
            worst = max(worst, abs(a.item() - b.item()) / abs(b.item()))
    return worst < tol, f"max relative loss difference {worst:.1e}" + (" (mixed precision)" if amp else "")


def inference_pair(tv, ours, images):
    tv.eval()

    def tv_run():
        with torch.inference_mode():
            return tv(images)

    return tv_run, lambda: M.detect(ours, images)


def same_detections(expected, got):
    for e, o in zip(expected, got):
        same = len(e["boxes"]) == len(o["boxes"]) and torch.equal(e["labels"], o["labels"])
        if not (same and torch.allclose(e["boxes"], o["boxes"], atol=1e-3) and
                torch.allclose(e["scores"], o["scores"], atol=1e-5)):
            return False, "detections differ"
    return True, f"the same {sum(len(d['boxes']) for d in got)} detections"


def focal_pair(shape, device, g):
    logits = (torch.randn(shape, generator=g) * 2 - 3).to(device)
    targets = (torch.rand(shape, generator=g) < 2e-4).float().to(device)

    def run(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets, reduction="sum")
        loss.backward()
        return loss.detach(), x.grad

    return lambda: run(sigmoid_focal_loss), lambda: run(focal_loss)


def match_pair(cfg, size, n, device, g):
    anchors = M.make_anchors(cfg, size, device)[0]
    boxes = [t["boxes"].to(device) for t in random_targets(n, size, g, low=50, high=50)]
    matcher = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def ours():
        padded, _, valid = A.pad_targets(boxes, [torch.zeros(len(b), dtype=torch.long) for b in boxes])
        return A.match(anchors, padded, valid)

    return lambda: torch.stack([matcher(box_iou(b, anchors)) for b in boxes]), ours


def memory_mb(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory(which, size):
    """Run in a fresh process: how far one training step (after a warm-up step) raises the resident set."""
    tv, ours = make_pair((size, size), torch.device("cpu"))
    images = [torch.rand(3, size, size) for _ in range(2)]
    targets = random_targets(2, (size, size), torch.Generator().manual_seed(1))
    step = train_steps(tv, ours, images, targets)[which == "ours"]
    step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so that the step must ask for its own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set (Linux)
    base = memory_mb("VmRSS")
    step()
    return memory_mb("VmHWM") - base


def cuda_peak_memory(step):
    """How far one training step (after a warm-up step) raises CUDA's allocated memory, in MiB."""
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def setup_device(name):
    """The device, made current (so that synchronize and memory statistics are its own, not cuda:0's), TF32
    off: TF32 convs move outputs by ~1e-3. The float32 rows are IEEE float32; the AMP row is the fast one."""
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    return device


def main(args):
    p = QUICK if args.quick else FULL
    device = setup_device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []

    def row(what, times, check, target, unit="s"):
        ratio = times[1] / times[0]
        rows.append({"what": what, "torchvision": times[0], "ours": times[1], "ratio": ratio, "target": target,
                     "equal": check[0], "check": check[1], "unit": unit})
        print(f"{what}: torchvision {times[0]:.3f} {unit}, ours {times[1]:.3f} {unit}, ours/tv {ratio:.2f} "
              f"(target <= {target}); {check[1]}", flush=True)

    s = p["train_size"]
    tv, ours = make_pair((s, s), device)
    images = [torch.rand(3, s, s, generator=g).to(device) for _ in range(2)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(2, (s, s), g)]
    check = check_train_losses(tv, ours, images, targets)
    row(f"training step: ResNet-50, 2 x {s}x{s}, 80 classes", race(*train_steps(tv, ours, images, targets),
                                                                  p["repeats"], p["warmup"], device), check, 0.6)
    if device.type == "cuda":
        row(f"training step with AMP, 2 x {s}x{s}", race(*train_steps(tv, ours, images, targets, amp=True),
                                                         p["repeats"], p["warmup"], device),
            check_train_losses(tv, ours, images, targets, amp=True), 0.6)
    if device.type == "cuda":  # the memory row, measured now on this training pair, is printed last
        peaks, how = [cuda_peak_memory(step) for step in train_steps(tv, ours, images, targets)], "CUDA allocated"
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--size", str(s), "--peak-memory"]
        peaks = [statistics.median(float(subprocess.run(cmd + [which], capture_output=True, text=True,
                                                        check=True).stdout) for _ in range(p["memory_runs"]))
                 for which in ("torchvision", "ours")]
        how = f"resident set, median of {p['memory_runs']} fresh processes"
    h, w = p["infer_size"]
    tv, ours = make_pair((h, w), device)
    ours = ours.for_inference()  # as infer.py and app.py run it: frozen BN folded, channels-last
    for n in (1, p["infer_batch"]):
        imgs = [torch.rand(3, h, w, generator=g).to(device) for _ in range(n)]
        tv_run, our_run = inference_pair(tv, ours, imgs)
        check = same_detections(tv_run(), our_run())
        row(f"inference with pre/postprocessing: {n} x {h}x{w}",
            race(tv_run, our_run, p["repeats"], p["warmup"], device), check, 0.9)
    tv_fl, our_fl = focal_pair(p["focal"], device, g)
    (lt, gt), (lo, go) = tv_fl(), our_fl()
    ok = abs(lo - lt) / lt < 1e-4 and torch.allclose(go, gt, rtol=1e-4, atol=1e-7)
    row(f"focal loss, forward + backward, {tuple(p['focal'])} logits", race(tv_fl, our_fl, p["repeats"] * 3,
        p["warmup"] + 1, device), (bool(ok), f"loss {lo.item():.6g} vs {lt.item():.6g}, gradients close"), 0.5)
    tv_m, our_m = match_pair(ours.cfg, p["match_size"], p["match_images"], device, g)
    equal = torch.equal(tv_m(), our_m())
    row(f"anchor matching: {p['match_images']} images x 50 boxes, {p['match_size'][0]}x{p['match_size'][1]} anchors",
        race(tv_m, our_m, p["repeats"] * 3, p["warmup"] + 1, device),
        (equal, "the same assignments" if equal else "assignments differ"), 0.5)
    row(f"peak memory of the training step, 2 x {s}x{s}", peaks, (True, how), 0.8, "MiB")
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "tf32": False}
    D.write_json(args.out, {"machine": machine, "quick": args.quick, "rows": rows})
    print("\n| | torchvision | ours | ours / torchvision | target | results |\n|---|---|---|---|---|---|")
    for r in rows:
        fmt = "{:.0f} MiB" if r["unit"] == "MiB" else "{:.3f} s"
        print(f"| {r['what']} | {fmt.format(r['torchvision'])} | {fmt.format(r['ours'])} | {r['ratio']:.2f} | "
              f"<= {r['target']} | {r['check']} |")
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small inputs and one repeat (smoke test)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--peak-memory", choices=["torchvision", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.peak_memory:
        print(peak_memory(args.peak_memory, args.size))
    else:
        main(args)

"""This RetinaNet against torchvision's, side by side: the same weights, the same inputs, equal results.

    python -m tools.bench                   # the full table on this machine's CPU
    python -m tools.bench --quick           # small inputs, one repeat: a smoke test of the whole table
    python -m tools.bench --device cuda     # on a GPU, with AMP rows

Both models hold the same weights (ours converted with weights.from_torchvision) and torchvision's usual
fine-tuning setup: frozen batch norm, stem and res2 frozen, 80 classes. They alternate over --repeats
after a warm-up; the table gives the medians and ours / torchvision, and each row says whether the
two results agreed (losses within 1e-4 relative, the same detections, the same assignments).
One row races the quick start's training iteration (train.QUICKSTART: ResNet-10 from scratch, 16 images of
160 px) against the same detector built from torchvision's parts, ours in the layout train.py picks; on a CPU
that computes bfloat16 natively, again with both under bfloat16 autocast (train.py's default there), and
ResNet-50 inference with ours under bfloat16 against torchvision's float32, checked by COCO AP (bench_pairs).
The pairs and their checks are in bench_pairs.py.
Peak memory is measured in a fresh process per model. The table also goes to bench.json.
"""
import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import data as D
import export
import model as M
import train
import weights as W
from engine import probe_layout
from tools import bench_pairs as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL = dict(train_size=512, infer_size=(800, 1216), infer_batch=4, focal=(2, 120000, 80), match_images=8,
            match_size=(800, 1333), repeats=5, warmup=1, memory_runs=3, quickstart_batch=16)
QUICK = dict(train_size=256, infer_size=(320, 480), infer_batch=2, focal=(2, 20000, 80), match_images=2,
             match_size=(320, 480), repeats=1, warmup=0, memory_runs=1, quickstart_batch=2)


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


def memory_mb(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory(which, size):
    """Run in a fresh process: how far one training step (after a warm-up step) raises the resident set."""
    pair = P.make_pair((size, size), torch.device("cpu"))
    images = [torch.rand(3, size, size) for _ in range(2)]
    targets = P.random_targets(2, (size, size), torch.Generator().manual_seed(1))
    step = P.train_steps(*pair, images, targets)[which == "ours"]
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
    pair = P.make_pair((s, s), device)  # (torchvision's, ours, torchvision's loss settings)
    images = [torch.rand(3, s, s, generator=g).to(device) for _ in range(2)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in P.random_targets(2, (s, s), g)]
    # Checked before any race: each side steps on its own loss (normalised its own way), so their weights part.
    check = P.check_train_losses(*pair, images, targets)
    amp_check = P.check_train_losses(*pair, images, targets, amp=True) if device.type == "cuda" else None
    row(f"training step: ResNet-50, 2 x {s}x{s}, 80 classes", race(*P.train_steps(*pair, images, targets),
                                                                  p["repeats"], p["warmup"], device), check, 0.6)
    if device.type == "cuda":
        row(f"training step with AMP, 2 x {s}x{s}", race(*P.train_steps(*pair, images, targets, amp=True),
                                                         p["repeats"], p["warmup"], device), amp_check, 0.6)
    n, q, q_arch = p["quickstart_batch"], train.QUICKSTART["min_size"], train.QUICKSTART["arch"]
    images_q = [torch.rand(3, q, q, generator=g).to(device) for _ in range(n)]
    targets_q = [{k: v.to(device) for k, v in t.items()} for t in P.random_targets(n, (q, q), g, num_classes=4)]
    for amp in [False] + [True] * bool(device.type == "cpu" and M.native_bfloat16()):  # bfloat16: train.py's here
        tv_q, ours_q, loss_q = P.make_quickstart_pair(device)  # the quick start's iteration, fresh for each arm
        nhwc = device.type == "cuda" or probe_layout(ours_q, loss_q, n, torch.bfloat16 if amp else None)[0]
        ours_q = ours_q.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)  # train.py's
        ok, message = P.check_train_losses(tv_q, ours_q, loss_q, images_q, targets_q, amp=amp)
        times = race(*P.train_steps(tv_q, ours_q, loss_q, images_q, targets_q, amp=amp), p["repeats"], p["warmup"],
                     device)
        row(f"quick start's training iteration: {q_arch}, {n} x {q}x{q}, 4 classes" + (", both under bfloat16 "
            "autocast" if amp else ""), times, (ok, f"{message}; {n / times[1]:.1f} vs {n / times[0]:.1f} images/s"),
            1.0)
    if device.type == "cuda":  # the memory row, measured now on this training pair, is printed last
        peaks, how = [cuda_peak_memory(step) for step in P.train_steps(*pair, images, targets)], "CUDA allocated"
    else:
        cmd = [sys.executable, "-m", "tools.bench", "--size", str(s), "--peak-memory"]
        peaks = [statistics.median(float(subprocess.run(cmd + [which], capture_output=True, text=True, check=True,
                                                        cwd=ROOT).stdout) for _ in range(p["memory_runs"]))
                 for which in ("torchvision", "ours")]
        how = f"resident set, median of {p['memory_runs']} fresh processes"
    h, w = p["infer_size"]
    tv, ours, _ = P.make_pair((h, w), device)
    ours = ours.for_inference()  # as infer.py and app.py run it: frozen BN folded, channels-last
    batches = {n: [torch.rand(3, h, w, generator=g).to(device) for _ in range(n)] for n in (1, p["infer_batch"])}
    for n, imgs in batches.items():
        tv_run, our_run = P.inference_pair(tv, ours, imgs)
        check = P.same_detections(tv_run(), our_run())
        row(f"inference with pre/postprocessing: {n} x {h}x{w}",
            race(tv_run, our_run, p["repeats"], p["warmup"], device), check, 0.9)
    if device.type == "cpu" and M.native_bfloat16():  # infer.py's and app.py's default on this CPU (--amp auto)
        imgs = batches[p["infer_batch"]]
        coco = os.environ.get("RETINANET_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
        check = ((None, "AP not checked with --quick") if args.quick else
                 P.bfloat16_coco_ap(os.path.join(coco, "coco_val2017_subset")))
        row(f"inference, ours under bfloat16 autocast ({M.native_bfloat16()}), torchvision float32: {len(imgs)} x "
            f"{h}x{w}", race(*P.inference_pair(tv, ours, imgs, amp=True), p["repeats"], p["warmup"], device), check,
            0.5)
    if device.type == "cpu":  # the exported network on ONNX Runtime's CPU provider, inside our model.detect
        with tempfile.TemporaryDirectory() as tmp:
            export.export_onnx(ours, os.path.join(tmp, "retinanet.onnx"))
            runtime = W.OnnxRetinaNet(os.path.join(tmp, "retinanet.onnx"))  # loaded: the file may go
        threads = f"ONNX Runtime {runtime.threads} intra-op threads, 1 inter-op; PyTorch {torch.get_num_threads()}"
        for n, imgs in batches.items():
            tv_run, ort_run = P.inference_pair(tv, runtime, imgs)
            ok, message = P.same_detections(tv_run(), ort_run(), score_atol=1e-4)
            row(f"inference with ONNX Runtime, pre/postprocessing: {n} x {h}x{w}",
                race(tv_run, ort_run, p["repeats"], p["warmup"], device), (ok, f"{message} ({threads})"), 0.5)
    tv_fl, our_fl = P.focal_pair(p["focal"], device, g)
    (lt, gt), (lo, go) = tv_fl(), our_fl()
    ok = abs(lo - lt) / lt < 1e-4 and torch.allclose(go, gt, rtol=1e-4, atol=1e-7)
    row(f"focal loss, forward + backward, {tuple(p['focal'])} logits", race(tv_fl, our_fl, p["repeats"] * 3,
        p["warmup"] + 1, device), (bool(ok), f"loss {lo.item():.6g} vs {lt.item():.6g}, gradients close"), 0.5)
    tv_m, our_m = P.match_pair(ours.cfg, p["match_size"], p["match_images"], device, g)
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

"""The training loop (§4.1 "Optimization"), as DETR's engine.py: train.py sets a run up and calls `train`, an
iteration of which is `forward_backward` (forward, loss, backward) then the SGD step; evaluations (evaluate.py)
at --eval-at and at the end, the best of them kept as best.pt.

    python train.py                                                           # trains, evaluates at the end
    python train.py --eval-at 250 500 750 --out runs/quickstart               # AP against iterations, best.pt

A run's log, OUT/metrics.jsonl, has a row every --log-every iterations (losses, LR, images/s, the
gradient norm and the classifier's monitor) and one at each evaluation; OUT/loss.png draws it.
"""
import copy
import json
import math
import os
import platform
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M
import weights as W
from evaluate import STATS, evaluate
from loss import MONITOR, retinanet_loss


def print0(*a, **kw):
    """print on rank 0 only (on every process without DDP)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def train(model, loss_cfg, loader, optimizer, scheduler, scaler, val_ds, *, start, iters, out, batch_size,
          log_every=20, ckpt_every=1000, eval_at=(), final_eval=True, eval_workers=0, run_args=None, amp=None,
          clip_grad=None):
    """The loop (§4.1), from iteration `start` to `iters`: an SGD step an iteration; a log row every log_every;
    COCO evaluations at eval_at and at the end (final_eval, also when resumed after the last iteration); a
    checkpoint every ckpt_every and at the end, to out/checkpoint.pt with run_args (train.py's flags); with eval_at,
    the weights of the best evaluation so far (COCO AP) also to out/best.pt, with that evaluation. A non-finite
    loss or gradient stops the run before its step writes NaN into the weights, naming the last good checkpoint;
    clip_grad: the gradients' total norm clipped to it before each step (None: not clipped, as the paper).
    model: the network, or under DDP its DistributedDataParallel wrapper (nanoGPT's raw_model is what is evaluated
    and saved). amp: autocast's dtype in training (None: float32); evaluations are float32.
    Returns the last evaluation's COCO numbers (None without one)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    raw_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    ckpt_path, last_good, stats, t0 = os.path.join(out, "checkpoint.pt"), None, None, time.time()
    best_path, best = os.path.join(out, "best.pt"), best_so_far(out, start) if rank == 0 else -1.0
    pixels, anchor_cache = [0, 0], {}  # pixels in the batches, of the images (1.0: no padding); anchors a size
    bar = tqdm(total=iters, initial=start, disable=rank != 0, dynamic_ncols=True)
    model.train()
    for it, (images, targets) in zip(range(start, iters), loader):
        pixels[0] += images[:, 0].numel()
        pixels[1] += sum(h * w for h, w in (t["size"] for t in targets))
        values = forward_backward(model, raw_model.cfg, loss_cfg, images, targets, optimizer, scaler, anchor_cache,
                                  amp, clip_grad)
        where = f"{ckpt_path} (iteration {last_good})" if last_good else "none written yet"
        stop_if_not_finite(values, it, where, scaler.is_enabled())  # before the step writes NaN into the weights
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = it + 1
        if rank == 0 and (done % log_every == 0 or done == iters):
            speed, lr = (done - start) * batch_size / (time.time() - t0), scheduler.get_last_lr()[0]
            log(out, {"iter": done, **values, "lr": lr, "img_per_s": float(f"{speed:.3g}"),
                      "pixels_per_image_pixel": round(pixels[0] / pixels[1], 4)})
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.4f}", img_s=f"{speed:.1f}")
        bar.update(1)
        if done in eval_at or (done == iters and final_eval):  # AP against iterations
            t_eval = time.time()
            stats = evaluate(raw_model, val_ds, rank=rank, world=world, workers=eval_workers,
                             out_dir=out if done == iters else None)
            if rank == 0:
                log(out, {"iter": done, "eval": {k: stats[k] for k in STATS}})
                if eval_at and stats["AP"] > best:  # kept by val AP, as detectron2's BestCheckpointer
                    best = save_best(best_path, best, stats, raw_model, optimizer, scheduler, scaler, done, loss_cfg,
                                     run_args)
            t0 += time.time() - t_eval  # images/s counts training time only
        if done % ckpt_every == 0 or done == iters:
            W.check_finite(raw_model, done, where)  # on every rank: the weights are the same on all
            if rank == 0:
                W.save_checkpoint(ckpt_path, raw_model, optimizer, scheduler, scaler, done, loss_cfg, run_args)
            last_good = done
    bar.close()
    if start == iters and final_eval:  # resumed after the last iteration: only the evaluation is left
        stats = evaluate(raw_model, val_ds, rank=rank, world=world, out_dir=out, workers=eval_workers)
    if rank == 0 and os.path.exists(os.path.join(out, "metrics.jsonl")):
        plot_losses(out)
    print0(f"trained {iters - start} iterations in {time.time() - t0:.0f} s; checkpoint: {ckpt_path}; "
           f"{pixels[0] / max(pixels[1], 1):.3f} batch pixels per image pixel (padding)")
    return stats


def stop_if_not_finite(values, it, where, scaler_skips=False):
    """FloatingPointError naming the last good checkpoint (`where`) when iteration it's loss or gradient norm is not
    finite (clipping cannot mend an infinite norm). scaler_skips: float16 AMP's loss scaler, which overflows now and
    then by design and skips that step itself, lowering its scale: a non-finite norm is its business then."""
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"iteration {it}: loss is {values['loss']}; stopped. Last good checkpoint: {where}")
    if values["grad_norm"] is not None and not math.isfinite(values["grad_norm"]) and not scaler_skips:
        raise FloatingPointError(f"iteration {it}: gradient norm is {values['grad_norm']} with a finite loss "
                                 f"({values['loss']:.4g}); stopped. Last good checkpoint: {where}")


def save_best(path, best, stats, model, optimizer, scheduler, scaler, iteration, loss_cfg, run_args):
    """best.pt: the checkpoint of the evaluation `stats`, better than `best`, with its numbers. Returns its AP."""
    W.save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, loss_cfg, run_args,
                      {k: stats[k] for k in STATS})
    before = f"{best:.3f}" if best >= 0 else "none"
    print0(f"best.pt: AP {stats['AP']:.3f} at iteration {iteration} (best before: {before})")
    return stats["AP"]


def best_so_far(out, start):
    """The best val AP in out/metrics.jsonl up to iteration `start` (a resumed run's; its best.pt was written then),
    -1 when none; a run that starts afresh removes an earlier run's best.pt."""
    if start == 0:
        if os.path.exists(os.path.join(out, "best.pt")):
            os.remove(os.path.join(out, "best.pt"))
        return -1.0
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):
        return -1.0
    return max((r["eval"]["AP"] for r in read_metrics(out) if "eval" in r and r["iter"] <= start), default=-1.0)


def forward_backward(model, cfg, loss_cfg, images, targets, optimizer, scaler, anchor_cache, amp=None,
                     clip_grad=None):
    """One iteration's forward, loss (§4 "Training") and backward: the gradients, not yet the optimizer's step.
    Returns the loss and its parts (all-reduced: every process sees the same), the gradient norm before clipping
    (None under float16 AMP without clip_grad, whose scaler skips non-finite steps itself) and the classifier's
    monitor (this process's images), as floats. clip_grad: the total norm the gradients are clipped to.
    anchor_cache: {padded size: (R, 4) anchors}, filled as sizes come. amp: autocast's dtype for the network
    (float16 with the scaler on CUDA, bfloat16 on a CPU) or None; the losses are float32 either way."""
    device = M.model_device(model)
    x = M.normalize(images.to(device, non_blocking=True), cfg)
    with torch.autocast(device.type, dtype=amp or torch.float16, enabled=amp is not None):
        cls_logits, box_deltas = model(x)
    if x.shape[-2:] not in anchor_cache:
        anchor_cache[x.shape[-2:]] = M.make_anchors(cfg, x.shape[-2:], device)[0]
    boxes, labels = [t["boxes"].to(device) for t in targets], [t["labels"].to(device) for t in targets]
    losses = retinanet_loss(cls_logits, box_deltas, anchor_cache[x.shape[-2:]], boxes, labels, loss_cfg,
                            reduce_num_fg=all_reduce_mean)
    loss = losses["cls"] + losses["box"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled() and clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones (the AMP recipe of PyTorch's docs)
    params = [] if scaler.is_enabled() and not clip_grad else [p for g in optimizer.param_groups for p in g["params"]
                                                                  if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else loss.new_zeros(())
    if clip_grad:  # each gradient x min(1, clip_grad / norm): the direction kept, the step bounded
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    loss_value, cls_value, box_value, grad_norm, *watch = torch.cat([  # one device sync for all
        all_reduce_mean(torch.stack([loss, losses["cls"], losses["box"]]).detach()), norm.reshape(1),
        losses["monitor"]]).tolist()
    return {"loss": loss_value, "cls": cls_value, "box": box_value, "grad_norm": None if not params else grad_norm,
            **{k: None if math.isnan(v) else round(v, 5) for k, v in zip(MONITOR, watch)}}


def probe_layout(model, loss_cfg, batch_size, amp=None, steps=3, cache=None):
    """Whether channels-last trains faster than NCHW on this CPU, timed: `steps` iterations (the first a warm-up)
    of copies of the network in each layout (the run's weights and BN statistics untouched) on a batch of its
    largest padded size with random pixels and boxes. No rule held on every CPU (docs/performance.md): on an AMD Zen 4
    the quick start's ResNet-10 was 11% faster channels-last in float32 and 12% slower in bfloat16; on an Intel
    AMX host ResNet-18 was faster NCHW in both. The answer is kept in `cache` (a JSON file; default under
    ~/.cache) by CPU, PyTorch, ISA, threads, dtype, network and batch. Returns (nhwc, a line saying why)."""
    cache = cache or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "retinanet",
                                  "layouts.json")
    cfg, isa = model.cfg, (torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA"))
    size = [-(-s // cfg.size_divisible) * cfg.size_divisible for s in (cfg.min_size, cfg.max_size)]
    key = repr((_cpu_name(), torch.__version__, isa, torch.get_num_threads(), str(amp), cfg.arch, cfg.norm,
                cfg.channels, cfg.head_norm, batch_size, tuple(size)))
    known = _read_cache(cache)
    if key not in known:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, generator=g)
        xy = torch.rand(batch_size, 5, 2, generator=g) * torch.tensor(size[::-1]) * 0.7  # 5 boxes an image
        boxes = torch.cat([xy, xy + torch.tensor(size[::-1]) * 0.2], -1)
        targets = [{"boxes": b, "labels": torch.randint(cfg.num_classes, (5,), generator=g)} for b in boxes]
        seconds = {}
        for layout in ("nchw", "nhwc"):
            net = copy.deepcopy(model).train()
            net = net.to(memory_format=torch.channels_last) if layout == "nhwc" else net
            opt, times = torch.optim.SGD(net.parameters(), lr=0.0), []
            for _ in range(steps):
                t = time.perf_counter()
                forward_backward(net, cfg, loss_cfg, images, targets, opt, torch.amp.GradScaler("cpu", enabled=False),
                                 {}, amp)
                times.append(time.perf_counter() - t)
            seconds[layout] = round(min(times[1:]), 3)
        known = {**_read_cache(cache), key: seconds}  # with what other runs wrote meanwhile
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        D.write_json(cache, known)
        how = "measured"
    else:
        how = f"as measured before ({cache})"
    s = known[key]
    return s["nhwc"] < s["nchw"], f"{how}: {s['nchw']:.3f} s an iteration NCHW, {s['nhwc']:.3f} s channels-last"


def channels_last(layout, device, probe=None):
    """The memory layout of training, as (channels-last?, why): --layout's, or for auto, channels-last on CUDA
    (cuDNN's float16 convolutions prefer it) and on a CPU the faster of the two as probe() times it
    (engine.probe_layout; no rule by ISA held on every host, docs/performance.md), NCHW without a probe."""
    if layout != "auto":
        return layout == "nhwc", f"--layout {layout}"
    if device.type == "cuda" or probe is None:
        return device.type == "cuda", f"--layout auto, {device.type}"
    nhwc, why = probe()
    return nhwc, f"--layout auto, the faster here, {why}"


def _read_cache(path):
    """The layouts measured before, {} when none (or the file is not one this wrote)."""
    try:
        with open(path) as f:
            known = _parse(f.read())
    except OSError:
        return {}
    return known if isinstance(known, dict) else {}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


def all_reduce_mean(x):
    """The mean of x over the processes (DDP; one process: x as is): the loss normaliser and the logged losses."""
    if dist.is_initialized():
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def log(run_dir, row):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def keep_metrics_until(run_dir, iteration):
    """Drop the metrics.jsonl rows after `iteration` (logged after the last checkpoint, before a crash),
    so that a resumed run's log has each iteration once."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if (row := _parse(line)) and row["iter"] <= iteration]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(rows)

        D.write_atomic(path, write)


def read_metrics(run_dir):
    """The rows of run_dir/metrics.jsonl (losses and evaluations), without a torn last line."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for line in f if (row := _parse(line))]


def _parse(line):
    """A metrics row, or None for a blank line or the half-written last line of a killed run."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def plot_losses(run_dir):
    import matplotlib  # only here: importing train.py loads no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(run_dir) if "loss" in row]  # not the evaluation rows
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "cls", "box"):
        ax.plot([r["iter"] for r in rows], [r[key] for r in rows], label=key)
    ax.set(xlabel="iteration", ylabel="loss", yscale="log", title=os.path.basename(os.path.abspath(run_dir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "loss.png"), dpi=100)
    plt.close(fig)

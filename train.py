"""Train and evaluate RetinaNet (§4.1 "Optimization", §5), on one process or many with torchrun.

    python train.py                                               # CPU quick start on the shapes set, prints AP
    python train.py --data /path/to/coco                          # the paper's 1x recipe (§4.1), one process
    torchrun --nproc_per_node=8 train.py --data /path/to/coco     # the same on 8 GPUs, 2 images each
    torchrun --nproc_per_node=8 train.py --data /path/to/coco --arch resnet101 --schedule 1.5 --scales 640 800
    python train.py --data /path/to/coco --eval-only --weights runs/retinanet/checkpoint.pt
    python train.py --resume --out runs/quickstart                # continue an interrupted run

With --data the defaults are the paper's: ResNet-50 with ImageNet weights and frozen BN, SGD with
momentum 0.9 and weight decay 1e-4, LR 0.01 for 16 images (scaled linearly with --batch-size),
500 warmup iterations, LR x0.1 at 60k and 80k of 90k iterations, 800-px images, flips. Without it
they are the quick start's: the shapes set (generated if missing), ResNet-18 from scratch with
trainable BN, 64-channel FPN and heads with GroupNorm, 160-px images, 500 iterations (recipes.py).
"""
import argparse
import bisect
import json
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from tqdm import tqdm

import backbone as B
import checkpoint as C
import data as D
import model as M
import pretrain
import weights as W
from evaluate import category_ids, evaluate
from loss import MONITOR, batch_shares, retinanet_loss
from recipes import PAPER, PRESETS, QUICKSTART, SYNTHETIC


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="COCO-format root (annotations/instances_{split}.json, {split}/); none: the shapes quick start")
    a("--preset", choices=list(PRESETS), help="defaults of the flags below: paper (with --data), quickstart "
      "(without), dense (the dense set, data/dense)")
    a("--train-ann"), a("--train-images"), a("--val-ann"), a("--val-images")  # custom layouts
    for key, paper in PAPER.items():  # default: the paper's value with --data, the quick start's without
        value = QUICKSTART[key] if paper is None else paper
        kind = type(value[0]) if isinstance(value, list) else type(value)
        a("--" + key.replace("_", "-"), type=kind, nargs="+" if isinstance(value, list) else None,
          help=f"default: {paper} (--data), {QUICKSTART[key]} (quick start)")
    a("--schedule", type=float, default=1.0, help="multiplies --iters, --steps (1x = 90k iterations)")
    a("--scales", type=int, nargs="+", help="multi-scale training: shorter sides to pick from (e.g. 640 672 ... 800)")
    a("--flip", type=float, default=0.5, help="probability of a horizontal flip in training")
    a("--alpha", type=lambda s: None if s == "none" else float(s), default=0.25, help="alpha of FL, or 'none'")
    a("--gamma", type=float, default=2.0, help="gamma of FL (0: alpha-balanced CE)")
    a("--prior", type=float, default=0.01, help="pi of the prior initialisation (§3.3)")
    a("--box-loss", default="smooth_l1", choices=["smooth_l1", "l1", "giou"])
    a("--ohem", type=float, default=0, help="OHEM negatives:positives ratio, not FL over all (Table 1d; inf: no ratio)")
    a("--momentum", type=float, default=0.9), a("--weight-decay", type=float, default=1e-4)
    a("--warmup-factor", type=float, default=1 / 3, help="LR factor at the first warmup iteration (Detectron)")
    a("--amp", action="store_true", help="mixed precision on CUDA (the losses stay float32)")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--layout", choices=["auto", "nchw", "nhwc"], default="auto", help="memory format (auto: nhwc on CUDA, AVX-512)")
    a("--deterministic", action="store_true", help="deterministic CUDA kernels: --resume reproduces a GPU run too")
    a("--aspect-grouping", action=argparse.BooleanOptionalAction, default=True,
      help="batch landscape with landscape and portrait with portrait images (less padding)")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=20)
    a("--eval-at", type=int, nargs="+", default=[], help="also evaluate at these iterations (AP against iterations)")
    a("--finetune", help="start from a checkpoint of this project, or 'torchvision' / 'torchvision-v2'")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--eval-only", action="store_true", help="evaluate --weights on the val split")
    a("--weights", help="checkpoint to evaluate with --eval-only")
    a("--no-eval", action="store_true", help="skip the evaluation at the end")
    return p


def fill_defaults(args):
    args.preset = args.preset or ("paper" if args.data else "quickstart")
    if args.preset == "paper" and not args.data:
        raise ValueError("--preset paper needs --data (a COCO-format root)")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.data = args.data or SYNTHETIC[args.preset][0]
    args.head_norm = None if args.head_norm == "none" else args.head_norm
    args.iters, args.steps = round(args.iters * args.schedule), [round(s * args.schedule) for s in args.steps]
    return args


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def datasets(args, train=True):
    """The train (if train) and val datasets, by the standard layout or the --*-ann/--*-images flags."""
    ann, images = D.coco_paths(args.data, args.val_split)
    val = D.CocoDetection(args.val_ann or ann, args.val_images or images)
    if not train:
        return None, val
    ann, images = D.coco_paths(args.data, args.train_split)
    return D.CocoDetection(args.train_ann or ann, args.train_images or images, train=True, min_size=args.min_size,
                           max_size=args.max_size, scales=args.scales, flip=args.flip, seed=args.seed), val


def build_model(args, ds, device):
    names, cat_ids = ds.class_names, tuple(ds.cat_ids)
    if args.finetune:  # §3.3: a new class count gets a new, prior-initialised class output layer
        model = W.load_checkpoint(args.finetune)  # the architecture is the checkpoint's, the recipe this run's
        cfg = model.cfg
        if cfg.num_classes != len(names):
            model.cls_head.reset_output(len(names), args.prior)
        cfg.num_classes, cfg.class_names, cfg.category_ids = len(names), names, cat_ids
        cfg.min_size, cfg.max_size, cfg.alpha, cfg.gamma, cfg.ohem_ratio = (args.min_size, args.max_size, args.alpha,
                                                                            args.gamma, args.ohem)
        return model.train().to(device)
    cfg = M.ModelConfig(
        num_classes=len(names), class_names=names, category_ids=cat_ids, arch=args.arch, norm=args.norm,
        freeze_at=args.freeze_at, channels=args.channels, head_norm=args.head_norm, prior=args.prior,
        anchor_sizes=tuple(args.anchor_sizes), alpha=args.alpha, gamma=args.gamma, ohem_ratio=args.ohem,
        box_loss=args.box_loss, min_size=args.min_size, max_size=args.max_size, size_divisible=args.size_divisible)
    weights = None if args.backbone_weights == "none" else args.backbone_weights
    return M.RetinaNet(cfg, backbone_weights=weights).to(device)


def main(args):
    args = fill_defaults(args)
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # also makes cuDNN pick deterministic algorithms
        torch.backends.cudnn.benchmark = False
    # DDP, detected from torchrun's environment (nanoGPT style): NCCL on GPUs, gloo on CPUs.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available() and args.device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
    amp = args.amp and device.type == "cuda"
    if args.amp and not amp:
        print0("--amp needs CUDA: training in float32")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    path, make = SYNTHETIC.get(args.preset, (None, None))
    if args.data == path and not os.path.exists(D.coco_paths(args.data, "val")[0]) and local == 0:
        print0(f"writing the {args.preset} set to {path} (once) ...")  # once a node: nodes need not share a disk
        make(path)
    if ddp:
        dist.barrier()

    if args.eval_only:
        if not args.weights:
            raise ValueError("--eval-only needs --weights CHECKPOINT")
        model, val = W.load_checkpoint(args.weights, device), datasets(args, train=False)[1]
        try:
            category_ids(model.cfg, val)  # a model of other classes: one line naming both files
        except ValueError as e:
            raise ValueError(f"{args.weights}: {e}") from None
        stats = evaluate(model, val, rank=rank, world=world, out_dir=args.out)
        print0(json.dumps(stats))
        return {"model": model, "stats": stats}

    train_ds, val_ds = datasets(args)
    if args.backbone_weights == pretrain.WEIGHTS and not os.path.exists(pretrain.WEIGHTS):
        raise FileNotFoundError(f"{pretrain.WEIGHTS}: no pretrained backbone yet; `python pretrain.py` makes it")
    model = build_model(args, train_ds, device)
    cfg = model.cfg
    if ddp and cfg.norm == "bn":  # trainable BN: normalise over all processes' images, as one process would
        model = B.sync_batch_norm(model)  # before the optimizer takes the parameters
    nhwc = M.channels_last(args.layout, device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    print0(f"memory layout: {'channels-last' if nhwc else 'NCHW'} (--layout {args.layout}, {isa})")
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr * args.batch_size / 16  # §4.1: 0.01 for 16 images, linear scaling rule
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def lr_factor(it):  # linear warmup from warmup_factor, then x0.1 at each step (§4.1)
        warm = args.warmup_factor + (1 - args.warmup_factor) * it / args.warmup_iters if it < args.warmup_iters else 1
        return warm * 0.1 ** bisect.bisect_right(args.steps, it)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    ckpt_path, start = os.path.join(args.out, "checkpoint.pt"), 0
    if args.resume:
        start = C.restore(ckpt_path, model, optimizer, scheduler, scaler, device)
        print0(f"resumed from {ckpt_path} at iteration {start}")
    if rank == 0:  # the log of this run: up to its checkpoint when resumed, empty when it starts afresh
        C.keep_metrics_until(args.out, start)
    train_model = torch.nn.parallel.DistributedDataParallel(model, [device] if cuda else None) if ddp else model
    fill = tuple(round(255 * m) for m in cfg.pixel_mean)
    groups = train_ds.aspect_groups() if args.aspect_grouping else None
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=D.BatchStream(len(train_ds), args.batch_size, args.seed, start, args.iters, rank,
                                              world, groups),
        collate_fn=partial(D.collate, size_divisible=cfg.size_divisible, fill=fill), num_workers=args.workers,
        pin_memory=cuda)

    def all_reduce_mean(x):  # the loss normaliser: mean foreground count over ranks (one process: as is)
        if ddp:
            dist.all_reduce(x)
            x = x / world
        return x

    anchor_cache, last_good, t0, pixels, stats = {}, None, time.time(), [0, 0], None  # pixels: in batches, of images
    bar = tqdm(total=args.iters, initial=start, disable=rank != 0, dynamic_ncols=True)
    model.train()
    for it, (images, targets) in zip(range(start, args.iters), loader):
        pixels[0] += images[:, 0].numel()
        pixels[1] += sum(h * w for h, w in (t["size"] for t in targets))
        x = M.normalize(images.to(device, non_blocking=True), cfg)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            cls_logits, box_deltas = train_model(x)
        if x.shape[-2:] not in anchor_cache:
            anchor_cache[x.shape[-2:]] = M.make_anchors(cfg, x.shape[-2:], device)[0]
        anchors = anchor_cache[x.shape[-2:]]
        boxes, labels = [t["boxes"].to(device) for t in targets], [t["labels"].to(device) for t in targets]
        losses = retinanet_loss(cls_logits, box_deltas, anchors, boxes, labels, reduce_num_fg=all_reduce_mean,
                                **cfg.loss_args())
        loss = losses["cls"] + losses["box"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # A non-finite loss, or a finite loss with non-finite gradients, stops the run before the step
        # writes NaN into every weight. Under AMP the scaler skips steps with non-finite gradients and
        # lowers its scale (its job), so only the loss is checked there. The loss is all-reduced and DDP
        # has averaged the gradients: every rank sees the same numbers and stops together.
        grads = [] if amp else [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        loss_value, cls_value, box_value, grad_norm, *watch = torch.cat([  # one device sync for all
            all_reduce_mean(torch.stack([loss, losses["cls"], losses["box"]]).detach()), norm.reshape(1),
            losses["monitor"]]).tolist()  # the monitor: rank 0's own images
        where = f"{ckpt_path} (iteration {last_good})" if last_good else "none written yet"
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"iteration {it}: loss is {loss_value}; stopped. Last good checkpoint: {where}")
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"iteration {it}: gradient norm is {grad_norm} with a finite loss "
                                     f"({loss_value:.4g}); stopped. Last good checkpoint: {where}")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = it + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.iters):
            speed = (done - start) * args.batch_size / (time.time() - t0)
            row = {"iter": done, "loss": loss_value, "cls": cls_value, "box": box_value,
                   "lr": scheduler.get_last_lr()[0], "img_per_s": float(f"{speed:.3g}"),
                   "pixels_per_image_pixel": round(pixels[0] / pixels[1], 4),  # 1.0: no padding
                   **{k: None if math.isnan(v) else round(v, 5) for k, v in zip(MONITOR, watch)}}
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.4f}", img_s=f"{speed:.1f}")
        bar.update(1)
        if done in args.eval_at or (done == args.iters and not args.no_eval):  # AP against iterations
            t_eval = time.time()
            stats = evaluate(model, val_ds, rank=rank, world=world, workers=min(args.workers, 2),
                             out_dir=args.out if done == args.iters else None)
            t0 += time.time() - t_eval  # images/s counts training time only
            if rank == 0:  # and where this batch's CE and FL would put the loss and its gradient (§3.2)
                shares = batch_shares(cls_logits, anchors, boxes, labels, cfg.fg_iou, cfg.bg_iou)
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"iter": done, "eval": stats, "shares": shares}) + "\n")
        if done % args.ckpt_every == 0 or done == args.iters:
            C.check_finite(model, done, where)  # on every rank: the weights are the same on all
            if rank == 0:
                C.save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, done, args)
            last_good = done
    bar.close()
    if rank == 0 and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        C.plot_losses(args.out)
    print0(f"trained {args.iters - start} iterations in {time.time() - t0:.0f} s; checkpoint: {ckpt_path}; "
           f"{pixels[0] / max(pixels[1], 1):.3f} batch pixels per image pixel (padding)")
    if start == args.iters and not args.no_eval:  # resumed after the last iteration: only the evaluation is left
        stats = evaluate(model, val_ds, rank=rank, world=world, out_dir=args.out, workers=min(args.workers, 2))
    if not args.no_eval and stats:
        print0(f"COCO AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}  ({args.out})")
    if ddp:
        dist.destroy_process_group()
    return {"model": model, "stats": stats}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None

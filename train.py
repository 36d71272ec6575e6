"""Train and evaluate RetinaNet (§4.1 "Optimization", §5), on one process or many with torchrun.

    python train.py                                               # CPU quick start on the shapes set, prints AP
    python train.py --data /path/to/coco                          # the paper's 1x recipe (§4.1), one process
    torchrun --nproc_per_node=8 train.py --data /path/to/coco     # the same on 8 GPUs, 2 images each
    torchrun --nproc_per_node=8 train.py --data /path/to/coco --arch resnet101 --schedule 1.5 --scales 640 800
    python train.py --data /path/to/coco --eval-only --weights runs/retinanet/checkpoint.pt
    python train.py --resume --out runs/quickstart                # continue an interrupted run

With --data the defaults are the paper's (PAPER below): ResNet-50 with ImageNet weights and frozen BN,
SGD with momentum 0.9 and weight decay 1e-4, LR 0.01 for 16 images (scaled linearly with --batch-size),
500 warmup iterations, LR x0.1 at 60k and 80k of 90k iterations, 800-px images, flips. Without it
they are the quick start's (QUICKSTART): the shapes set (written if missing), ResNet-10 from scratch
with trainable BN, 64-channel FPN and heads with GroupNorm, 160-px images, 1,000 iterations, under
bfloat16 autocast on CPUs that compute it natively (AMX, AVX512-BF16), the losses in float32.

main() sets up (the process, the data, the model, the loss's settings, the optimizer) and calls
engine.train, the loop (DETR's main.py and engine.py).
"""
import argparse
import bisect
import json
import os
from functools import partial

import torch
import torch.distributed as dist

import anchors as A
import backbone as B
import data as D
import model as M
import shapes
import weights as W
from engine import channels_last, keep_metrics_until, print0, probe_layout, train
from evaluate import category_ids, evaluate
from loss import LossConfig

# The recipes --preset chooses from, each spelled out key by key rather than derived from the other, so that
# changing one (a faster quick start) never changes the other. Any flag overrides its preset's value.
# §4.1: ResNet-50 with ImageNet weights, SGD, LR 0.01 for 16 images, 500 warmup iterations, LR x0.1 at 60k
# and 80k of 90k iterations, 800-px images (shorter side)
PAPER = dict(arch="resnet50", norm="frozen", freeze_at=2, backbone_weights="imagenet", channels=256, head_norm=None,
             anchor_sizes=[32, 64, 128, 256, 512], min_size=800, max_size=1333, batch_size=16, lr=0.01, iters=90000,
             steps=[60000, 80000], warmup_iters=500, ckpt_every=2000, workers=4, train_split="train2017",
             val_split="val2017", out="runs/retinanet", size_divisible=32, amp="off")  # see ModelConfig.size_divisible
# From scratch on a CPU: ResNet-10 with trainable BN, 64-channel FPN and GroupNorm heads, 160-px shapes; 1,000
# iterations, the LR x0.1 at 70% and 85%, so the last quarter is a plateau (AP against minutes, each lever and
# host: docs/performance.md); the loader in the training process (2 cores: a worker process took 8%)
QUICKSTART = dict(arch="resnet10", norm="bn", freeze_at=0, backbone_weights="none", channels=64, head_norm="gn",
                  anchor_sizes=[16, 32, 64, 128, 256], min_size=160, max_size=160, batch_size=16, lr=0.04, iters=1000,
                  steps=[700, 850], warmup_iters=50, ckpt_every=250, workers=0, train_split="train",
                  val_split="val", out="runs/quickstart", size_divisible=32, amp="auto")
PRESETS = {"paper": PAPER, "quickstart": QUICKSTART}
QUICKSTART_DATA = "data/shapes"  # the quick start's set, written by shapes.make_shapes when missing


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument

    def preset(key):  # the help of a flag whose default comes from --preset
        return f"default: {PAPER[key]} with --data (paper), {QUICKSTART[key]} without (quick start)"

    # what to train on
    a("--data", help="COCO-format root (annotations/instances_{split}.json, {split}/); none: the shapes quick start, "
      "or your own set given by --train-ann, --train-images, --val-ann, --val-images (the paper's recipe)")
    a("--preset", choices=list(PRESETS), help="the defaults of the flags below marked 'default: ...' (default: paper "
      "with --data, quickstart without)")
    a("--train-ann", help="training annotations, if not DATA/annotations/instances_{train split}.json")
    a("--train-images", help="training images, if not DATA/{train split}/")
    a("--val-ann", help="val annotations, if not DATA/annotations/instances_{val split}.json")
    a("--val-images", help="val images, if not DATA/{val split}/")
    a("--train-split", help=preset("train_split"))
    a("--val-split", help=preset("val_split"))
    # the network: model.ModelConfig (§3.4, §4)
    a("--arch", choices=list(B.ARCHS), help=preset("arch"))
    a("--norm", choices=["frozen", "bn"], help="the backbone's batch norm; " + preset("norm"))
    a("--freeze-at", type=int, help="stages frozen, the stem first; " + preset("freeze_at"))
    a("--backbone-weights", help="'imagenet', a .pth state dict or 'none'; " + preset("backbone_weights"))
    a("--channels", type=int, help="FPN and head width; " + preset("channels"))
    a("--head-norm", choices=["none", "gn"], help="GroupNorm in the heads (torchvision v2); " + preset("head_norm"))
    a("--prior", type=float, default=0.01, help="pi of the prior initialisation (§3.3)")
    a("--anchor-sizes", type=int, nargs="+", help="anchor size on P3-P7 (with --finetune: the checkpoint's unless "
      "given); " + preset("anchor_sizes"))
    a("--anchor-ratios", type=float, nargs="+", help="aspect ratios h/w (default 0.5 1 2, or --finetune's)")
    a("--anchor-scales", type=float, nargs="+", help="multiples of the size (default 1 1.26 1.59, or --finetune's)")
    a("--min-size", type=int, help="shorter side of the images; " + preset("min_size"))
    a("--max-size", type=int, help="longest side at most; " + preset("max_size"))
    a("--size-divisible", type=int, help="batches padded to a multiple of it; " + preset("size_divisible"))
    # the loss: loss.LossConfig (§3, §4 "Training")
    a("--alpha", type=lambda s: None if s == "none" else float(s), default=0.25, help="alpha of FL, or 'none'")
    a("--gamma", type=float, default=2.0, help="gamma of FL (0: alpha-balanced CE)")
    a("--box-loss", default="smooth_l1", choices=["smooth_l1", "l1", "giou"])
    a("--ohem", type=float, default=0, help="OHEM negatives:positives ratio, not FL over all (Table 1d; inf: no ratio)")
    # the optimisation (§4.1)
    a("--batch-size", type=int, help="images an iteration, over all processes; " + preset("batch_size"))
    a("--lr", type=float, help="learning rate for 16 images, scaled linearly with --batch-size; " + preset("lr"))
    a("--iters", type=int, help=preset("iters"))
    a("--steps", type=int, nargs="+", help="iterations at which the LR drops x0.1; " + preset("steps"))
    a("--schedule", type=float, default=1.0, help="multiplies --iters, --steps (1x = 90k iterations)")
    a("--warmup-iters", type=int, help=preset("warmup_iters"))
    a("--warmup-factor", type=float, default=1 / 3, help="LR factor at the first warmup iteration (Detectron)")
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=1e-4)
    a("--clip-grad", type=float, metavar="MAX_NORM", help="clip the gradients' total norm to it (default: off, as "
      "the paper); the norm before clipping is logged as grad_norm")
    # the data pipeline
    a("--scales", type=int, nargs="+", help="multi-scale training: shorter sides to pick from (e.g. 640 672 ... 800)")
    a("--flip", type=float, default=0.5, help="probability of a horizontal flip in training")
    a("--aspect-grouping", action=argparse.BooleanOptionalAction, default=True,
      help="batch landscape with landscape and portrait with portrait images (less padding)")
    a("--workers", type=int, help="data loading processes; " + preset("workers"))
    # the machine
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--amp", nargs="?", const="on", choices=["auto", "on", "off"], help="autocast: float16 on CUDA, bfloat16 on a "
      "CPU, the losses float32 (auto: bfloat16 on CPUs with AMX or AVX512-BF16); " + preset("amp"))
    a("--layout", choices=["auto", "nchw", "nhwc"], default="auto", help="auto: nhwc on CUDA, the faster timed on CPU")
    a("--deterministic", action="store_true", help="deterministic CUDA kernels: --resume reproduces a GPU run too")
    a("--seed", type=int, default=0)
    # the run
    a("--out", help="folder of the checkpoint, metrics and evaluation; " + preset("out"))
    a("--log-every", type=int, default=20)
    a("--ckpt-every", type=int, help=preset("ckpt_every"))
    a("--eval-at", type=int, nargs="+", default=[], help="also evaluate at these iterations (AP against iterations)")
    a("--no-eval", action="store_true", help="skip the evaluation at the end")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--finetune", help="start from a checkpoint of this project, or 'torchvision' / 'torchvision-v2'")
    a("--eval-only", action="store_true", help="evaluate --weights on the val split")
    a("--weights", help="checkpoint to evaluate with --eval-only")
    return p


def fill_defaults(args):
    """The preset's value for every flag left unset, and --schedule applied."""
    own = args.train_ann or args.val_ann  # your own set: the annotation files named, no COCO-format root
    args.preset = args.preset or ("paper" if args.data or own else "quickstart")
    if args.preset == "paper" and not (args.data or own):
        raise ValueError("--preset paper needs --data (a COCO-format root) or --train-ann and --val-ann")
    args.from_preset = sorted(k for k, v in PRESETS[args.preset].items() if getattr(args, k) is None)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or (None if own else QUICKSTART_DATA)
    args.head_norm = None if args.head_norm == "none" else args.head_norm
    args.iters, args.steps = round(args.iters * args.schedule), [round(s * args.schedule) for s in args.steps]
    return args


def setup_process(args):
    """Deterministic kernels if asked, DDP from torchrun's environment (nanoGPT style: NCCL on GPUs, gloo on
    CPUs), the device and the seed. Returns (device, rank, world)."""
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # also makes cuDNN pick deterministic algorithms
        torch.backends.cudnn.benchmark = False
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
    torch.manual_seed(args.seed)
    return device, rank, world


def datasets(args, train=True):
    """The train (if train) and val datasets, by the standard layout or the --*-ann/--*-images flags."""
    need = ("val_ann", "val_images", "train_ann", "train_images")[:4 if train else 2]  # without --data, all named
    missing = [f"--{k.replace('_', '-')}" for k in need if not getattr(args, k)]
    if args.data is None and missing:
        raise ValueError(f"without --data your own set needs {', '.join(missing)}")
    ann, images = D.coco_paths(args.data or "", args.val_split)
    val = D.CocoDetection(args.val_ann or ann, args.val_images or images)
    if not train:
        return None, val
    ann, images = D.coco_paths(args.data or "", args.train_split)
    return D.CocoDetection(args.train_ann or ann, args.train_images or images, train=True, min_size=args.min_size,
                           max_size=args.max_size, scales=args.scales, flip=args.flip, seed=args.seed), val


def build_model(args, ds, device):
    """The network: a new one from the flags, or --finetune's (its architecture, this run's classes and scale)."""
    names, cat_ids = ds.class_names, tuple(ds.cat_ids)
    if args.finetune:  # the anchor sizes too when given on the command line, else the checkpoint's
        sizes = None if "anchor_sizes" in args.from_preset else args.anchor_sizes
        return W.load_for_finetune(args.finetune, names, cat_ids, args.prior, args.min_size, args.max_size, sizes,
                                   args.anchor_ratios, args.anchor_scales).train().to(device)
    cfg = M.ModelConfig(
        num_classes=len(names), class_names=names, category_ids=cat_ids, arch=args.arch, norm=args.norm,
        freeze_at=args.freeze_at, channels=args.channels, head_norm=args.head_norm, prior=args.prior,
        anchor_sizes=tuple(args.anchor_sizes), anchor_ratios=tuple(args.anchor_ratios or A.RATIOS),
        anchor_scales=tuple(args.anchor_scales or A.SCALES), min_size=args.min_size, max_size=args.max_size,
        size_divisible=args.size_divisible)
    weights = None if args.backbone_weights == "none" else args.backbone_weights
    return M.RetinaNet(cfg, backbone_weights=weights).to(device)


def build_optimizer(args, model):
    """SGD with momentum and weight decay on the trainable parameters, LR for 16 images scaled linearly to the
    batch (§4.1), and its schedule: linear warmup from --warmup-factor, then x0.1 at each of --steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr * args.batch_size / 16  # §4.1: 0.01 for 16 images, linear scaling rule
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def lr_factor(it):
        warm = args.warmup_factor + (1 - args.warmup_factor) * it / args.warmup_iters if it < args.warmup_iters else 1
        return warm * 0.1 ** bisect.bisect_right(args.steps, it)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def make_loader(args, ds, cfg, start, rank, world, pin_memory):
    """This process's batches from iteration `start` on (data.BatchStream: the same batches for any process
    count, worker count or resume), padded to cfg.size_divisible with the mean colour."""
    fill = tuple(round(255 * m) for m in cfg.pixel_mean)
    groups = ds.aspect_groups() if args.aspect_grouping else None
    sampler = D.BatchStream(len(ds), args.batch_size, args.seed, start, args.iters, rank, world, groups)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, pin_memory=pin_memory,
                                       collate_fn=partial(D.collate, size_divisible=cfg.size_divisible, fill=fill))


def main(args):
    args = fill_defaults(args)
    device, rank, world = setup_process(args)
    os.makedirs(args.out, exist_ok=True)
    if (args.preset == "quickstart" and args.data == QUICKSTART_DATA and not os.path.exists(D.coco_paths(
            args.data, "val")[0]) and int(os.environ.get("LOCAL_RANK", 0)) == 0):
        print0(f"writing the shapes set to {args.data} (once) ...")  # once a node: nodes need not share a disk
        shapes.make_shapes(args.data)
    if dist.is_initialized():
        dist.barrier()
    if args.eval_only:
        return evaluate_only(args, device, rank, world)

    train_ds, val_ds = datasets(args)
    model = build_model(args, train_ds, device)
    category_ids(model.cfg, val_ds)  # a val set of other classes fails now, not at the first evaluation
    loss_cfg = LossConfig(alpha=args.alpha, gamma=args.gamma, box_loss=args.box_loss, ohem_ratio=args.ohem)
    if dist.is_initialized() and model.cfg.norm == "bn":  # trainable BN: normalise over all processes' images
        model = B.sync_batch_norm(model)  # before the optimizer takes the parameters
    amp, why = M.autocast_choice(args.amp, device)
    print0(why)
    # DDP: every process must take the same layout, so the rule's (NCHW on a CPU), no probe
    probe = None if dist.is_initialized() else partial(probe_layout, model, loss_cfg, args.batch_size, amp)
    nhwc, why = channels_last(args.layout, device, probe)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    print0(f"memory layout: {'channels-last' if nhwc else 'NCHW'} ({why})")
    optimizer, scheduler = build_optimizer(args, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    start = 0
    if args.resume:
        start = W.restore(os.path.join(args.out, "checkpoint.pt"), model, optimizer, scheduler, scaler, device)
        print0(f"resumed from {os.path.join(args.out, 'checkpoint.pt')} at iteration {start}")
    if rank == 0:  # the log of this run: up to its checkpoint when resumed, empty when it starts afresh
        keep_metrics_until(args.out, start)
    loader = make_loader(args, train_ds, model.cfg, start, rank, world, pin_memory=device.type == "cuda")
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
                 if dist.is_initialized() else model)  # DDP, nanoGPT style: engine.train evaluates and saves model
    stats = train(ddp_model, loss_cfg, loader, optimizer, scheduler, scaler, val_ds, start=start, iters=args.iters,
                  out=args.out, batch_size=args.batch_size, log_every=args.log_every, ckpt_every=args.ckpt_every,
                  eval_at=args.eval_at, final_eval=not args.no_eval, eval_workers=min(args.workers, 2),
                  run_args=vars(args), amp=amp, clip_grad=args.clip_grad)
    if stats and not args.no_eval:
        print0(f"COCO AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}  ({args.out})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"model": model, "stats": stats}


def evaluate_only(args, device, rank, world):
    """--eval-only: COCO AP of --weights on the val split (under --amp's autocast, as infer.py detects), refused
    before any image when its classes differ."""
    if not args.weights:
        raise ValueError("--eval-only needs --weights CHECKPOINT")
    model, val = W.load_checkpoint(args.weights, device), datasets(args, train=False)[1]
    try:
        category_ids(model.cfg, val)  # a model of other classes: one line naming both files
    except ValueError as e:
        raise ValueError(f"{args.weights}: {e}") from None
    amp, why = M.autocast_choice(args.amp, device)
    print0(why)
    stats = evaluate(model, val, rank=rank, world=world, out_dir=args.out, amp=amp is not None)
    print0(json.dumps({k: v for k, v in (stats or {}).items() if k != "per_class"}))  # printed as a table above
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"model": model, "stats": stats}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None

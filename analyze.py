"""The paper's analyses, reproduced on any checkpoint: Fig. 1, Fig. 4, a miniature Table 1, anchor coverage.

    python analyze.py curves                                   # Fig. 1: FL(p_t) for gamma in {0, .5, 1, 2, 5}
    python analyze.py cdf                                      # Fig. 4 for the quick start's model on shapes val
    python analyze.py cdf --weights CKPT --data /path/to/coco --split val2017 --max-images 500
    python analyze.py ablate --iters 300                       # Table 1 (a)-(f) in miniature, on the shapes set
    python analyze.py anchors --data ../shared/data/coco_val2017_subset --split val2017 --scale 800
    python analyze.py eval --weights CKPT --data DATA          # the COCO evaluation training runs

Each writes a PNG and the numbers behind it (CSV/JSON) into --out and prints a summary. Every number
comes from the functions training uses: anchors.py's matching, loss.py's targets and focal loss.
"""
import argparse
import json
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

import anchors as A
import data as D
import infer
import model as M
import train
from evaluate import evaluate
from loss import assign_targets, focal_loss

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
LEVELS = ("P3", "P4", "P5", "P6", "P7")
VARIANTS = {  # Table 1 of the paper: name -> (what, train.py flags)
    "a": ("CE, bias 0 (no prior)", ["--gamma", "0", "--alpha", "none", "--prior", "0.5"]),  # Table 1a, pi ignored
    "b": ("CE, prior pi=0.01", ["--gamma", "0", "--alpha", "none"]),  # §3.3
    "c": ("alpha-balanced CE, alpha=0.75", ["--gamma", "0", "--alpha", "0.75"]),  # best CE of Table 1a
    "d": ("FL gamma=2, alpha=0.25", ["--gamma", "2", "--alpha", "0.25"]),  # the paper's choice
    "f": ("OHEM 1:3, CE", ["--gamma", "0", "--alpha", "none", "--ohem", "3"]),  # Table 1d
    "e0.5": ("FL gamma=0.5, alpha=0.5", ["--gamma", "0.5", "--alpha", "0.5"]),  # Table 1b pairs
    "e1": ("FL gamma=1, alpha=0.25", ["--gamma", "1", "--alpha", "0.25"]),
    "e5": ("FL gamma=5, alpha=0.25", ["--gamma", "5", "--alpha", "0.25"]),
}


def focal_values(z, gamma, alpha=None):
    """FL of samples whose true-class logit is z (p_t = sigmoid(z)), by loss.py's focal_loss."""
    z = torch.as_tensor(z, dtype=torch.float32)
    return focal_loss(z, torch.ones_like(z), alpha=alpha, gamma=gamma, reduction="none").numpy()


def cmd_curves(args):
    p_t = np.linspace(0.001, 0.999, 999)
    z = np.log(p_t / (1 - p_t))
    table = {f"gamma={g:g}": focal_values(z, g) for g in args.gammas}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fl in table.items():
        ax.plot(p_t, fl, label=name + (" (CE)" if name == "gamma=0" else ""))
    ax.axvspan(0.6, 1.0, color="0.9", zorder=0)
    ax.text(0.8, 4.4, "well-classified\nexamples", ha="center")
    ax.set(xlabel="probability of ground truth class", ylabel="loss", ylim=(0, 5), title="Fig. 1: FL(p_t)")
    ax.legend(loc="upper center")
    save(fig, args.out, "curves", {"p_t": p_t.tolist(), **{k: v.tolist() for k, v in table.items()}})
    at_09 = {k: float(focal_values([np.log(9.0)], g)[0]) for k, g in zip(table, args.gammas)}  # p_t = 0.9
    print("CE / FL at p_t = 0.9: " + ", ".join(f"{k}: {-np.log(0.9) / v:.0f}x" for k, v in at_09.items()))
    return table


def save(fig, out, name, numbers):
    """PNG and JSON of one analysis, each written under a temporary name and renamed."""
    os.makedirs(out, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.tmp.png"), dpi=100)
    plt.close(fig)
    with open(os.path.join(out, f"{name}.tmp.json"), "w") as f:
        json.dump(numbers, f)
    for ext in ("png", "json"):
        os.replace(os.path.join(out, f"{name}.tmp.{ext}"), os.path.join(out, f"{name}.{ext}"))


def dataset(data, split, cfg=None, train_like=False, check_classes=True):
    """A split of a COCO-format root, checked against cfg's classes; train_like: resized as training does, unflipped."""
    split = split or ("val" if os.path.exists(D.coco_paths(data, "val")[0]) else "val2017")  # shapes, or COCO
    kw = dict(train=True, min_size=cfg.min_size, max_size=cfg.max_size, flip=0.0) if train_like else {}
    ds = D.CocoDetection(*D.coco_paths(data, split), **kw)
    if check_classes and cfg is not None and (cfg.num_classes != len(ds.class_names) or
                            (cfg.class_names and tuple(cfg.class_names) != ds.class_names)):
        raise ValueError(f"{D.coco_paths(data, split)[0]}: {len(ds.class_names)} classes "
                         f"({', '.join(ds.class_names[:3])}, ...) but the checkpoint has {cfg.num_classes} "
                         f"({', '.join(map(str, cfg.class_names[:3]))}, ...)")
    return ds


@torch.inference_mode()
def collect_logits(model, ds, batch_size=8, max_images=None, max_negatives=10**7, progress=tqdm):
    """Run the model over ds and assign anchors as training does. Returns the true-class logit z of
    every positive and every negative (anchor, class) sample outside the ignore band (p_t =
    sigmoid(z)), each sorted from easy to hard: FL decreases with z for every gamma >= 0, so this
    one order serves every gamma. Beyond max_negatives, negatives are a uniform sample (as Fig. 4's)."""
    cfg, device = model.cfg, next(model.parameters()).device
    count = len(ds) if max_images is None else min(len(ds), max_images)
    if count == 0:
        raise ValueError("the dataset has no images")
    pos, neg, seen, rng = [], [], 0, torch.Generator(device).manual_seed(0)
    fill = tuple(round(255 * m) for m in cfg.pixel_mean)
    for start in progress(range(0, count, batch_size), total=-(-count // batch_size)):
        images, targets = D.collate([ds[i] for i in range(start, min(start + batch_size, count))],
                                    cfg.size_divisible, fill)
        cls_logits, _ = model(M.normalize(images.to(device), cfg))
        anchors, _ = M.make_anchors(cfg, images.shape[-2:], device)
        _, _, onehot, keep = assign_targets(anchors, [t["boxes"].to(device) for t in targets],
                                            [t["labels"].to(device) for t in targets], cfg.num_classes,
                                            cfg.fg_iou, cfg.bg_iou, cfg.low_quality_matches)
        onehot, keep = onehot.bool(), keep.unsqueeze(-1)
        negatives = -cls_logits[~onehot & keep].float()
        cap, seen = max_negatives * len(targets) // count, seen + len(negatives)  # this batch's share
        if len(negatives) > cap:
            negatives = negatives[torch.rand(len(negatives), generator=rng, device=device) < cap / len(negatives)]
        pos.append(cls_logits[onehot & keep].float().cpu().numpy())
        neg.append(negatives.cpu().numpy())
    pos, neg = (-np.sort(-np.concatenate(x)) for x in (pos, neg))  # descending z: easy first
    if not len(pos):
        raise ValueError("no positive anchors: the images have no boxes")
    return {"pos": pos, "neg": neg, "images": count, "negatives_seen": seen}


def load_or_collect(model, ds, cache, key, **kw):
    """The cached logits for `key` (checkpoint and data), or a fresh model run saved to `cache`."""
    if cache and os.path.exists(cache):
        with np.load(cache) as f:
            if str(f["key"]) == key:
                return {k: f[k] if f[k].ndim else f[k].item() for k in f.files if k != "key"}
    run = collect_logits(model, ds, **kw)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache + ".tmp.npz", key=key, **run)
        os.replace(cache + ".tmp.npz", cache)
    return run


def cache_key(weights, ann_file, max_images):
    stamp = [(os.path.abspath(p), os.path.getmtime(p)) for p in (weights, ann_file) if os.path.exists(p)]
    return json.dumps([weights, ann_file, stamp, max_images])


def cdf(z, gamma, points=1000):
    """Fig. 4: normalised FL of samples sorted low to high, cumulated. Returns (fraction, cdf) at
    `points` evenly spaced fractions, and the shares of the loss the hardest 20% and 1% carry."""
    loss = focal_values(z, gamma).astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(loss)])
    cum /= cum[-1] if cum[-1] > 0 else 1.0
    frac = np.linspace(0, 1, points)
    shares = {f"hardest {p:.0%}": float(1 - cum[int(round((1 - p) * len(loss)))]) for p in (0.2, 0.01)}
    return frac, cum[np.round(frac * len(loss)).astype(int)], shares


def cmd_cdf(args):
    model = infer.load_model(args.weights, args.device)
    ds = dataset(args.data, args.split, model.cfg, train_like=True)
    key = cache_key(args.weights, ds.ann_file, args.max_images)
    run = load_or_collect(model, ds, args.cache or os.path.join(args.out, "cdf_cache.npz"), key,
                          max_images=args.max_images)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    shares = {f"{g:g}": {} for g in args.gammas}
    for g in args.gammas:
        for ax, kind in zip(axes, ("pos", "neg")):
            x, y, shares[f"{g:g}"][kind] = cdf(run[kind], g)
            ax.plot(x, y, label=f"gamma={g:g}")
    for ax, kind in zip(axes, ("foreground", "background")):
        ax.set(xlabel=f"fraction of {kind} examples", ylabel="cumulative normalized loss", title=kind)
        ax.legend()
    numbers = {"images": run["images"], "positives": len(run["pos"]), "negatives": len(run["neg"]),
               "negatives_seen": run["negatives_seen"], "gammas": shares}
    save(fig, args.out, "cdf", numbers)
    print(json.dumps({k: v for k, v in numbers.items() if k != "gammas"}))
    for g, d in shares.items():
        print(f"gamma={g}: the hardest 20% / 1% carry {d['neg']['hardest 20%']:.1%} / {d['neg']['hardest 1%']:.1%} "
              f"of the negative loss, the hardest 20% {d['pos']['hardest 20%']:.1%} of the positive loss")
    return numbers


def cmd_ablate(args):
    """The same model, data, iterations and seed for every variant; only the loss (and init) differ."""
    base = ["--iters", str(args.iters), "--seed", str(args.seed), "--steps", str(args.iters * 3 // 4),
            str(args.iters * 9 // 10)] + (["--data", args.data] if args.data else []) + args.train_args.split()
    rows, t0 = {}, time.time()
    for name in args.variants:
        what, flags = VARIANTS[name]
        spent = time.time() - t0
        if rows and args.budget_minutes and spent + spent / len(rows) > 60 * args.budget_minutes:
            rows[name] = {"what": what, "result": "skipped: over --budget-minutes"}
            continue
        out = ["--out", os.path.join(args.out, "ablate", name)]
        run_args = train.get_args_parser().parse_args(base + flags + out)
        try:
            stats = train.main(run_args)["stats"]
            rows[name] = {"what": what, "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"]}
        except FloatingPointError as e:  # Table 1a: CE without the prior can diverge
            rows[name] = {"what": what, "result": f"diverged ({str(e).split(';')[0]})"}
        print(f"{name}: {rows[name]}")
    lines = ["| | loss | AP | AP50 | AP75 |", "|---|---|---|---|---|"] + [f"| ({k}) | {r['what']} | " + (
        " | ".join(f"{r[m]:.3f}" for m in ("AP", "AP50", "AP75")) if "AP" in r else f"{r['result']} | |") + " |"
        for k, r in rows.items()]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    done = {k: r for k, r in rows.items() if "AP" in r}
    ax.barh([f"({k}) {r['what']}" for k, r in done.items()], [r["AP"] for r in done.values()])
    ax.set(xlabel="COCO AP", title=f"Table 1 in miniature ({args.iters} iterations each)")
    save(fig, args.out, "ablate", {"iters": args.iters, "rows": rows, "markdown": "\n".join(lines)})
    print("\n".join(lines))
    return rows


def anchor_coverage(cfg, ds, max_images=None):
    """For every ground-truth box: its size, best anchor IoU, the level of that anchor, and how many
    anchors training makes positive for it (anchors.match, as training assigns them)."""
    rows = []
    for i in range(len(ds) if max_images is None else min(len(ds), max_images)):
        image, target = ds[i]
        boxes, d = target["boxes"], cfg.size_divisible
        anchors, per_level = M.make_anchors(cfg, [-(-s // d) * d for s in image.shape[1:]])  # padded as training
        iou = A.box_iou(boxes, anchors)  # (M, R)
        matched = A.match(anchors, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool),
                          cfg.fg_iou, cfg.bg_iou, cfg.low_quality_matches)[0]
        level = np.searchsorted(np.cumsum(per_level), iou.argmax(1).numpy(), side="right")
        for j, box in enumerate(boxes):
            rows.append({"size": float(((box[2] - box[0]) * (box[3] - box[1])).sqrt()), "best_iou": float(iou[j].max()),
                         "level": int(level[j]) + 3, "positives": int((matched == j).sum())})
    if not rows:
        raise ValueError("the dataset has no boxes")
    return rows


def cmd_anchors(args):
    cfg = infer.load_model(args.weights).cfg if args.weights else M.ModelConfig()  # default: the paper's anchors
    cfg.min_size, cfg.max_size = args.scale or cfg.min_size, args.max_size or cfg.max_size
    ds = dataset(args.data, args.split, cfg, train_like=True, check_classes=False)
    rows = anchor_coverage(cfg, ds, args.max_images)
    best = np.array([r["best_iou"] for r in rows])
    summary = {"boxes": len(rows), f"best IoU >= {cfg.fg_iou}": float((best >= cfg.fg_iou).mean()),
               f"best IoU >= {cfg.bg_iou}": float((best >= cfg.bg_iou).mean()),
               "only a low-quality match": float((best < cfg.fg_iou).mean()),
               "positives per box": float(np.mean([r["positives"] for r in rows])),
               "boxes with no positive": int(sum(r["positives"] == 0 for r in rows))}
    edges = [0, 16, 32, 64, 128, 256, 512, 1e9]
    sizes, bottom = np.digitize([r["size"] for r in rows], edges) - 1, np.zeros(len(edges) - 1)
    names = [f"{a:g}-{b:g}" if b < 1e9 else f">{a:g}" for a, b in zip(edges, edges[1:])]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    bands = ((cfg.fg_iou, 2, "best IoU >= fg"), (cfg.bg_iou, cfg.fg_iou, "ignore band"), (0, cfg.bg_iou, "below bg"))
    for lo, hi, label in bands:
        counts = np.bincount(sizes[(best >= lo) & (best < hi)], minlength=len(names))
        ax1.bar(names, counts, bottom=bottom, label=label)
        bottom += counts
    ax1.set(xlabel="box size sqrt(area), px", ylabel="boxes", title="best anchor IoU by box size")
    ax1.legend()
    ax2.bar(LEVELS, np.bincount([r["level"] - 3 for r in rows], minlength=5))
    ax2.set(ylabel="boxes", title="level of each box's best anchor")
    save(fig, args.out, "anchors", {"summary": summary, "size_bins": names, "boxes": rows})
    print(json.dumps(summary, indent=1))
    return summary


def cmd_eval(args):
    model = infer.load_model(args.weights, args.device)
    stats = evaluate(model, dataset(args.data, args.split, model.cfg), out_dir=args.out)
    print(json.dumps(stats))
    return stats


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["curves", "cdf", "ablate", "anchors", "eval"])
    p.add_argument("--weights", help=f"checkpoint (default {infer.DEFAULT_WEIGHTS}); anchors: its config")
    p.add_argument("--data", help="COCO-format root (default: data/shapes; ablate: the quick start's)")
    p.add_argument("--split", help="split of --data (default: val, else val2017)")
    p.add_argument("--out", default="runs/analyze")
    p.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    p.add_argument("--max-images", type=int, help="use the first N images")
    p.add_argument("--cache", help="cdf: per-sample logits cache (default OUT/cdf_cache.npz)")
    p.add_argument("--device", default="cpu"), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=300, help="ablate: iterations of each variant")
    p.add_argument("--budget-minutes", type=float, help="ablate: skip variants that would not fit")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--train-args", default="", help="ablate: more train.py flags for every variant")
    p.add_argument("--scale", type=int, help="anchors: shorter side (default: the checkpoint's, or 800)")
    p.add_argument("--max-size", type=int, help="anchors: longest side")
    return p


def main(args):
    if any(g < 0 for g in args.gammas):
        raise ValueError(f"gamma must be >= 0, got {min(args.gammas)}")
    args.data = args.data or ("data/shapes" if args.command in ("cdf", "anchors", "eval") else None)
    args.weights = args.weights or (infer.DEFAULT_WEIGHTS if args.command in ("cdf", "eval") else None)
    commands = dict(curves=cmd_curves, cdf=cmd_cdf, ablate=cmd_ablate, anchors=cmd_anchors, eval=cmd_eval)
    return commands[args.command](args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

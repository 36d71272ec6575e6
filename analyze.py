"""The paper's analyses, reproduced on any checkpoint: Fig. 1, Fig. 4 and where the loss goes, Table 1
with error bars and the imbalance sweep (study/ablate.py), Table 1 at the endpoint (study/endpoint.py), anchor
coverage, evaluation.

    python analyze.py curves                                   # Fig. 1: FL(p_t) for gamma in {0, .5, 1, 2, 5}
    python analyze.py cdf                                      # Fig. 4 and loss shares, quick start model, shapes val
    python analyze.py cdf --weights CKPT --data /path/to/coco --split val2017 --max-images 500
    python analyze.py ablate                                   # Table 1 (a)-(f) on the quick start's set (~30 min)
    python analyze.py ablate --preset dense                    # Table 1 with seeds on the dense set (the study)
    python analyze.py sweep                                    # FL - CE at three levels of imbalance
    python analyze.py endpoint                                 # Table 1 at the endpoint, LR chosen held out
    python analyze.py anchors --data ../shared/data/coco_val2017_subset --split val2017
    python analyze.py anchors --suggest --ann mine/train.json --images mine/img   # anchors for your boxes
    python analyze.py eval --weights CKPT --data DATA          # the COCO evaluation training runs

Each writes a PNG and the numbers behind it (JSON) into --out and prints a summary. Every number
comes from the functions training uses: anchors.py's matching, loss.py's targets and focal loss.
"""
import argparse
import dataclasses
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import anchors as A
import data as D
import infer
import model as M
import train
import weights as W
from evaluate import category_ids, evaluate
from fig4 import cache_key, easy_share, fig4, focal_values, load_or_collect, where_the_loss_goes
from loss import LossConfig
from study import ablate, dense, endpoint

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
LEVELS = ("P3", "P4", "P5", "P6", "P7")
SIZE_EDGES = (0, 16, 32, 64, 128, 256, 512, 1e9)  # box sizes, sqrt(area) in px
SIZE_BANDS = tuple(f"{a:g}-{b:g}" if b < 1e9 else f">{a:g}" for a, b in zip(SIZE_EDGES, SIZE_EDGES[1:]))


def fig1(gammas, bold=None, alpha=None):
    """Fig. 1: FL(p_t) for each gamma (0 is CE), the well-classified examples (p_t > .5) shaded as the
    paper does; `bold`: one more gamma drawn bold, with `alpha` if given (the app's sliders).
    Returns the figure, p_t, and {gamma: FL(p_t)}."""
    p_t = np.linspace(0.001, 0.999, 999)
    z = np.log(p_t / (1 - p_t))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves = {}
    for g in sorted(set(map(float, gammas)) | ({float(bold)} if bold is not None else set())):
        thick = bold is not None and g == float(bold)
        a = alpha if thick and alpha else None
        curves[g] = focal_values(z, g, a)
        ax.plot(p_t, curves[g], lw=3 if thick else 1.5, color="black" if thick else None,
                label=f"γ = {g:g}" + (" (CE)" if g == 0 else "") + (f", α = {a:g}" if a else ""))
    ax.axvspan(0.5, 1.0, color="0.9", zorder=0)
    ax.text(0.75, 2.0, "well-classified\nexamples", ha="center")
    ax.set(xlabel="probability of ground truth class", ylabel="loss", ylim=(0, 5), xlim=(0, 1),
           title="Fig. 1: focal loss against cross entropy")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig, p_t, curves


def cmd_curves(args):
    fig, p_t, curves = fig1(args.gammas)
    table = {f"gamma={g:g}": fl for g, fl in curves.items()}
    save(fig, args.out, "curves", {"p_t": p_t.tolist(), **{k: v.tolist() for k, v in table.items()}})
    at_09 = {f"gamma={g:g}": float(focal_values([np.log(9.0)], g)[0]) for g in curves}  # p_t = 0.9
    print("CE / FL at p_t = 0.9: " + ", ".join(f"{k}: {-np.log(0.9) / v:.0f}x" for k, v in at_09.items()))
    return table


def save(fig, out, name, numbers):
    D.save_figure(fig, out, name, numbers)
    plt.close(fig)


def split_paths(data, split=None, ann=None, images=None):
    """(annotation file, images folder): ann and images (--ann, --images: your own set), else the split of the
    COCO-format root data (default: val, else val2017)."""
    if ann:
        if not images:
            raise ValueError("--ann needs --images")
        return ann, images
    split = split or ("val" if os.path.exists(D.coco_paths(data, "val")[0]) else "val2017")  # shapes, or COCO
    return D.coco_paths(data, split)


def dataset(paths, cfg=None, train_like=False, check_classes=True):
    """The set of (annotation file, images folder), checked against cfg's classes; train_like: resized as training
    does, unflipped."""
    kw = dict(train=True, min_size=cfg.min_size, max_size=cfg.max_size, flip=0.0) if train_like else {}
    ds = D.CocoDetection(*paths, **kw)
    if check_classes and cfg is not None:
        category_ids(cfg, ds)  # by category id and name, as evaluate does: torchvision's 91 outputs serve COCO
    return ds


def cmd_cdf(args):
    model = infer.load_model(args.weights, args.device)
    ds = dataset(split_paths(args.data, args.split, args.ann, args.images), model.cfg, train_like=True)
    key = cache_key(args.weights, ds.ann_file, args.max_images, args.max_negatives)
    run = load_or_collect(model, ds, args.cache or os.path.join(args.out, "cdf_cache.npz"), key,
                          max_images=args.max_images, max_negatives=args.max_negatives,
                          assign=W.load_loss_config(args.weights))
    fig, curves, shares = fig4(run, args.gammas)
    where = where_the_loss_goes(run, args.gammas)
    numbers = {"images": run["images"], "positives": len(run["pos"]), "negatives": len(run["neg"]),
               "negatives_seen": run["negatives_seen"], "gammas": shares, "curves": curves, "where": where}
    save(fig, args.out, "cdf", numbers)
    print(json.dumps({k: numbers[k] for k in ("images", "positives", "negatives", "negatives_seen")}))
    for g, d in shares.items():
        print(f"gamma={g}: the hardest 20% / 1% carry {d['neg']['hardest 20%']:.1%} / {d['neg']['hardest 1%']:.1%} "
              f"of the negative loss, the hardest 20% {d['pos']['hardest 20%']:.1%} of the positive loss; easy "
              f"negatives (p_t > 0.9) carry {easy_share(where[g]['loss']):.1%} of all the loss and "
              f"{easy_share(where[g]['grad']):.1%} of its gradient")
    return numbers


def anchor_coverage(cfg, ds, max_images=None, assign=None):
    """For every ground-truth box: its size, best anchor IoU, the level of that anchor, and how many
    anchors training makes positive for it (anchors.match, as training assigns them with assign's IoU
    thresholds, a LossConfig, default the paper's)."""
    rows, assign = [], assign or LossConfig()
    for i in range(len(ds) if max_images is None else min(len(ds), max_images)):
        image, target = ds[i]
        boxes, d = target["boxes"], cfg.size_divisible
        anchors, per_level = M.make_anchors(cfg, [-(-s // d) * d for s in image.shape[1:]])  # padded as training
        iou = A.box_iou(boxes, anchors)  # (M, R)
        matched = A.match(anchors, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool),
                          assign.fg_iou, assign.bg_iou, assign.low_quality_matches)[0]
        level = np.searchsorted(np.cumsum(per_level), iou.argmax(1).numpy(), side="right")
        for j, box in enumerate(boxes):
            rows.append({"size": float(((box[2] - box[0]) * (box[3] - box[1])).sqrt()), "best_iou": float(iou[j].max()),
                         "level": int(level[j]) + 3, "positives": int((matched == j).sum()),
                         "box": [round(v, 2) for v in box.tolist()]})
    if not rows:
        raise ValueError("the dataset has no boxes")
    return rows


def preset_config(ann_file):
    """The recipe a dataset trains with by default (the shapes set: train.py's quickstart, the dense set: the
    study's dense, any other: train.py's paper) and a ModelConfig with its anchors and scale."""
    kinds = {c.get("supercategory") for c in D.load_coco(ann_file).cats.values()}
    name = {frozenset({"shape"}): "quickstart", frozenset({"coloured shape"}): "dense"}.get(frozenset(kinds), "paper")
    p = {"quickstart": train.QUICKSTART, "dense": dense.DENSE, "paper": train.PAPER}[name]
    return name, M.ModelConfig(anchor_sizes=tuple(p["anchor_sizes"]), min_size=p["min_size"], max_size=p["max_size"],
                               size_divisible=p["size_divisible"])


def cmd_anchors(args):
    paths = split_paths(args.data, args.split, args.ann, args.images)
    if args.weights:
        cfg, used = infer.load_model(args.weights).cfg, f"the checkpoint's ({args.weights})"
        assign = W.load_loss_config(args.weights)
    else:
        (name, cfg), assign = preset_config(paths[0]), LossConfig()
        used = f"the {name} recipe's, as this dataset trains by default"
    cfg.min_size, cfg.max_size = args.scale or cfg.min_size, args.max_size or cfg.max_size
    print(f"anchors of {cfg.anchor_sizes[0]:g}-{cfg.anchor_sizes[-1]:g} px on P3-P7, ratios {cfg.anchor_ratios}, "
          f"scales {tuple(round(c, 3) for c in cfg.anchor_scales)}, {cfg.min_size}-px images: {used}")
    ds = dataset(paths, cfg, train_like=True, check_classes=False)
    rows = anchor_coverage(cfg, ds, args.max_images, assign)
    best, fg, bg = np.array([r["best_iou"] for r in rows]), assign.fg_iou, assign.bg_iou
    summary = {"boxes": len(rows), f"best IoU >= {fg}": float((best >= fg).mean()),
               f"best IoU >= {bg}": float((best >= bg).mean()), "only a low-quality match": float((best < fg).mean()),
               "positives per box": float(np.mean([r["positives"] for r in rows])),
               "boxes with no positive": int(sum(r["positives"] == 0 for r in rows))}
    sizes, bottom = np.digitize([r["size"] for r in rows], SIZE_EDGES) - 1, np.zeros(len(SIZE_BANDS))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    bands = ((fg, 2, "best IoU >= fg"), (bg, fg, "ignore band"), (0, bg, "below bg"))
    for lo, hi, label in bands:
        counts = np.bincount(sizes[(best >= lo) & (best < hi)], minlength=len(SIZE_BANDS))
        ax1.bar(SIZE_BANDS, counts, bottom=bottom, label=label)
        bottom += counts
    ax1.set(xlabel="box size sqrt(area), px", ylabel="boxes", title="best anchor IoU by box size")
    ax1.legend()
    ax2.bar(LEVELS, np.bincount([r["level"] - 3 for r in rows], minlength=5))
    ax2.set(ylabel="boxes", title="level of each box's best anchor")
    print(json.dumps(summary, indent=1))
    if args.suggest:
        summary["suggest"] = suggest_anchors(cfg, ds, rows, args.max_images, assign)
    save(fig, args.out, "anchors", {"summary": summary, "size_bins": list(SIZE_BANDS), "boxes": rows, "config": used,
                                    "anchor_sizes": list(cfg.anchor_sizes), "scale": cfg.min_size})
    return summary


def suggest_anchors(cfg, ds, rows, max_images, assign):
    """--suggest: anchors.fit_anchors' sizes, scales and ratios for the boxes of rows (anchor_coverage's, at the
    training scale), then the coverage of both anchor sets as training matches (every anchor of the padded
    image, best IoU >= fg), overall and per size band, printed with the train.py flags that use the proposal."""
    (sizes, scales, ratios), _, _ = A.fit_anchors(torch.tensor([r["box"] for r in rows]), cfg.anchor_sizes,
                                                  cfg.anchor_scales, cfg.anchor_ratios, iou=assign.fg_iou)
    after = anchor_coverage(dataclasses.replace(cfg, anchor_sizes=sizes, anchor_scales=scales, anchor_ratios=ratios),
                            ds, max_images, assign)
    band = np.digitize([r["size"] for r in rows], SIZE_EDGES) - 1
    covered = [np.array([r["best_iou"] >= assign.fg_iou for r in x]) for x in (rows, after)]
    table = [{"band": name, "boxes": int((band == b).sum()), "before": float(covered[0][band == b].mean()),
              "after": float(covered[1][band == b].mean())} for b, name in enumerate(SIZE_BANDS) if (band == b).any()]
    flags = (f"--anchor-sizes {' '.join(str(s) for s in sizes)} --anchor-scales {' '.join(f'{c:g}' for c in scales)} "
             f"--anchor-ratios {' '.join(f'{r:g}' for r in ratios)}")
    print(f"boxes whose best anchor reaches IoU {assign.fg_iou}, before -> after the proposal:")
    for r in table + [{"band": "all", "boxes": len(rows), "before": covered[0].mean(), "after": covered[1].mean()}]:
        print(f"  {r['band']:>8} px: {r['boxes']:6d} boxes  {r['before']:6.1%} -> {r['after']:6.1%}")
    print(f"proposal (train.py): {flags}")
    return {"flags": flags, "anchor_sizes": list(sizes), "anchor_scales": list(scales), "anchor_ratios": list(ratios),
            "before": float(covered[0].mean()), "after": float(covered[1].mean()), "bands": table}


def cmd_eval(args):
    model = infer.load_model(args.weights, args.device)
    paths = split_paths(args.data, args.split, args.ann, args.images)
    stats = evaluate(model, dataset(paths, model.cfg), out_dir=args.out, score_thresh=args.score_thresh)
    print(json.dumps(stats))
    return stats


def study_tables(out):
    """Table 1 (mean ± std over seeds), the imbalance sweep and the miniature, as this file left them in out, in
    Markdown (app.py's Focal loss tab)."""
    parts = [endpoint.summary()] if endpoint.ledger() else []  # the endpoint runs so far, committed with the code
    for name, title in (("ablate_dense", "Table 1 on the dense set (`analyze.py ablate --preset dense`)"),
                        ("sweep", "FL − CE against imbalance (`analyze.py sweep`)"),
                        ("ablate_quickstart", "Table 1 in miniature, the quick start's set (`analyze.py ablate`)")):
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                numbers = json.load(f)
            parts.append(f"### {title}, {numbers['iters']} iterations a run\n\n{numbers['markdown']}")
    return "\n\n".join(parts) or ("Table 1 appears here once `python analyze.py ablate --preset dense` (the study, "
                                   "hours) or `python analyze.py ablate` (the miniature, about 30 minutes) has run.")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("command", choices=["curves", "cdf", "ablate", "sweep", "endpoint", "anchors", "eval"])
    a("--weights", help=f"checkpoint (default {infer.DEFAULT_WEIGHTS}); anchors: its config")
    a("--data", help="COCO-format root (default: data/shapes; ablate: its preset's set)")
    a("--split", help="split of --data (default: val, else val2017)")
    a("--out", default="runs/analyze")
    a("--gammas", type=float, nargs="+", default=list(GAMMAS))
    a("--max-images", type=int, help="use the first N images")
    a("--max-negatives", type=int, default=10**7, help="cdf: a uniform sample of at most this many negatives")
    a("--cache", help="cdf: per-sample logits cache (default OUT/cdf_cache.npz)")
    a("--device", default="cpu")
    a("--preset", choices=["quickstart", "dense"], default="quickstart", help="ablate: the set and recipe")
    a("--iters", type=int, help="ablate, sweep: iterations of each run (default: quickstart 200, dense its preset's)")
    a("--seeds", type=int, help="ablate: seeds of (b)-(d) (default 1, dense 3); sweep: of each arm (default 3)")
    a("--other-seeds", type=int, default=1, help="ablate: seeds of the other rows")
    a("--variants", nargs="+", default=list(ablate.VARIANTS), choices=list(ablate.VARIANTS))
    a("--levels", nargs="+", default=list(ablate.LEVELS), choices=list(ablate.LEVELS), help="sweep: the sets")
    a("--budget-minutes", type=float, help="ablate, sweep, endpoint: start no run that would end past it (default: "
      f"the miniature {ablate.MINIATURE_MINUTES}, else none; 0: none)")
    a("--report-only", action="store_true", help="ablate, sweep, endpoint: tabulate the finished runs, train none")
    a("--stage", choices=["lr", "table", "all"], default="all", help="endpoint: the LR runs, the table's, or both")
    a("--rows", nargs="+", choices=list(endpoint.ROWS), help="endpoint: the table's rows (default: all)")
    a("--ledger", help=f"endpoint: the finished runs' results (default {endpoint.LEDGER})")
    a("--lrs", type=float, nargs=2, metavar=("CE", "FL"), help="endpoint: each family's LR per 16 images, given "
      "(default: the LR stage's choice in the ledger)")
    a("--seed", type=int, help="endpoint: this seed's runs only (default: every seed of each row)")
    a("--train-args", default="", help="ablate, sweep, endpoint: more train.py flags for every run")
    a("--suggest", action="store_true", help="anchors: propose sizes, scales and ratios for the set's boxes "
      "(anchors.fit_anchors; use the training split), with the coverage before and after")
    a("--ann", help="cdf, anchors, eval: a COCO annotation file of your own (with --images) instead of --data")
    a("--images", help="the pictures of --ann")
    a("--scale", type=int, help="anchors: shorter side (default: the checkpoint's or the dataset's preset's)")
    a("--max-size", type=int, help="anchors: longest side")
    a("--score-thresh", type=float, help="eval: keep detections above it (default the checkpoint's, 0.05)")
    return p


def main(args):
    if any(g < 0 for g in args.gammas):
        raise ValueError(f"gamma must be >= 0, got {min(args.gammas)}")
    args.data = args.data or ("data/shapes" if args.command in ("cdf", "anchors", "eval") else None)
    args.weights = args.weights or (infer.DEFAULT_WEIGHTS if args.command in ("cdf", "eval") else None)
    quick = args.command == "ablate" and args.preset == "quickstart"  # the sweep trains with the dense recipe
    args.iters = args.iters or (200 if quick else endpoint.ITERS if args.command == "endpoint" else
                                dense.DENSE["iters"])
    commands = dict(curves=cmd_curves, cdf=cmd_cdf, ablate=ablate.cmd_ablate, sweep=ablate.cmd_sweep,
                    endpoint=endpoint.cmd_endpoint,
                    anchors=cmd_anchors, eval=cmd_eval)
    return commands[args.command](args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

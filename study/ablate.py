"""Table 1 as a study with error bars (§5.1): each loss trained with several seeds, COCO AP mean ± std,
AP against iterations, and the imbalance sweep. Run through analyze.py:

    python analyze.py ablate                         # the quick start's set: (a)-(f), one seed, 200 iterations
    python analyze.py ablate --preset dense          # the study: the dense set, 3 seeds for (b)-(d), 1 for the rest
    python analyze.py sweep                          # (b) vs (d), 3 seeds, at three levels of imbalance
    python analyze.py ablate --preset dense --report-only   # the table of the runs finished so far

Within a study every run has the same model, data, LR, schedule and, seed for seed, the same
initialisation and batches (train.py --seed): only the loss (and, for (a), the prior) differs. A run
that finished keeps OUT/ablate/<preset>-<iters>/<level>/<variant>/seed<s>/result.json and is not run again; one that was
interrupted resumes from its checkpoint: a killed study continues where it stopped, across sessions.
"""
import json
import os
import statistics
import time

import matplotlib.pyplot as plt
import numpy as np

import data as D
import shapes
import train
from engine import read_metrics
from evaluate import STATS
from study import dense, pretrain

VARIANTS = {  # name -> (the paper's table and row, the loss, train.py flags)
    "a": ("§3.3, §5.1: CE without the prior", "CE, bias 0 (no prior)", ["--gamma", "0", "--alpha", "none",
                                                                        "--prior", "0.5"]),
    "b": ("§3.3: CE with the prior (Table 1a's α = .5 row is this loss ×½)", "CE, prior π = .01",
          ["--gamma", "0", "--alpha", "none"]),
    "c": ("Table 1a, α = .75 (its best)", "α-balanced CE, α = .75", ["--gamma", "0", "--alpha", "0.75"]),
    "d": ("Table 1b, γ = 2, α = .25", "FL γ = 2, α = .25", ["--gamma", "2", "--alpha", "0.25"]),
    "e0.5": ("Table 1b, γ = .5, α = .5", "FL γ = .5, α = .5", ["--gamma", "0.5", "--alpha", "0.5"]),
    "e1": ("Table 1b, γ = 1, α = .25", "FL γ = 1, α = .25", ["--gamma", "1", "--alpha", "0.25"]),
    "e5": ("Table 1b, γ = 5, α = .25", "FL γ = 5, α = .25", ["--gamma", "5", "--alpha", "0.25"]),
    "f": ("Table 1d, OHEM 1:3, batch 128, NMS .5", "OHEM 1:3 of CE", ["--gamma", "0", "--alpha", "none",
                                                                     "--ohem", "3"]),
}
MAIN = ("b", "c", "d")  # the rows that get --seeds seeds; the others get --other-seeds
METRICS = ("AP", "AP50", "AP75", "APs")
# The sets of the sweep, from mild to COCO-like imbalance: (data folder, dense classes or None for the
# quick start's shapes, image size). Every level trains with the dense preset's recipe.
LEVELS = {"shapes": ("data/shapes", None, 160), "dense6": ("data/dense6", 6, 192), "dense": ("data/dense", 30, 192)}


def level_data(level, path=None, write=True, size=None, anchors=None):
    """The data folder of a level (or `path`), written first if missing (and the pretrained backbone the
    dense recipe starts from) unless not `write`, and its imbalance as dense.imbalance counts it (at the
    level's size and the dense recipe's anchors, or at `size` and `anchors`: another form of the set)."""
    default, classes, level_size = LEVELS[level]
    size, anchors = size or level_size, tuple(anchors or dense.DENSE["anchor_sizes"])
    path = path or default
    if not os.path.exists(D.coco_paths(path, "val")[0]):
        if not write:
            raise ValueError(f"{path}: not written yet, so no run on it has finished")
        shapes.make_shapes(path) if classes is None else dense.make_dense(path, num_classes=classes)
    if write and not os.path.exists(dense.BACKBONE):
        pretrain.main(pretrain.get_args_parser().parse_args([]))
    return path, dense.imbalance(dense.training_view(path, size), anchors)


def settings(flags):
    """What a run's result depends on besides the code: its flags, and the annotations and backbone they name."""
    def stamp(path):
        return [path, os.path.getsize(path), os.path.getmtime(path)] if os.path.exists(path) else [path]

    data = flags[flags.index("--data") + 1]
    return {"flags": flags, "files": [stamp(D.coco_paths(data, s)[0]) for s in ("train", "val")] + [stamp(
        dense.BACKBONE)]}


def train_run(out, flags):
    """One run of a study, resumable; its result (final COCO numbers, AP at the evaluation points) in
    out/result.json, also when it diverged. Returns that result. A folder whose saved settings (flags, data,
    backbone) differ from these is refused: its result or checkpoint belongs to another run. flags name the
    study's recipe as `--preset dense`; train.py gets it spelled out (dense.train_flags)."""
    path, saved = os.path.join(out, "result.json"), os.path.join(out, "settings.json")
    if os.path.exists(saved):
        with open(saved) as f:
            if json.load(f) != json.loads(json.dumps(settings(flags))):
                raise ValueError(f"{out}: made with other flags, data or backbone; remove it or choose another --out")
    elif os.path.exists(out):  # a folder of an earlier version of this study: its settings were not saved
        print(f"{out}: no settings.json; taken to be this run's")
    os.makedirs(out, exist_ok=True)
    D.write_json(saved, settings(flags))
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    resume = ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []
    try:
        run = train.main(train.get_args_parser().parse_args(dense.train_flags(flags) + ["--out", out] + resume))
        stats = run["stats"] and {k: run["stats"][k] for k in STATS}  # the 12 numbers: result.json stays small
        result = {"stats": stats, "curve": [row for row in read_metrics(out) if "eval" in row]}
    except FloatingPointError as e:  # CE without the prior can diverge (§5.1)
        result = {"diverged": str(e).split(";")[0]}
    D.write_json(path, result)
    return result


def summarize(results):
    """Mean and sample standard deviation of each metric over the runs that trained, and how many diverged."""
    stats = [r["stats"] for r in results if "stats" in r]
    row = {"seeds": len(results), "diverged": len(results) - len(stats)}
    for m in METRICS:
        row[m] = mean_std([s[m] for s in stats if s[m] >= 0])  # COCOeval's -1: no object of that size
    return row


def fmt(cell):
    return "–" if cell is None else f"{cell[0]:.3f}" + ("" if cell[1] is None else f" ± {cell[1]:.3f}")


def study(args, recipe, level, variants, seeds_of):
    """Every (variant, seed) run of one level with a train.py preset; returns {variant: [result of each seed]}."""
    if recipe == "dense":
        data = level_data(level, args.data, write=not args.report_only)[0]
    else:
        data = args.data or train.QUICKSTART_DATA
    size = str(LEVELS[level][2]) if recipe == "dense" else str(train.QUICKSTART["min_size"])
    evals = [round(args.iters * k / 4) for k in (1, 2, 3)]
    base = ["--preset", recipe, "--iters", str(args.iters), "--steps", str(args.iters * 3 // 4),
            str(args.iters * 9 // 10), "--ckpt-every", str(max(1, args.iters // 4)), "--min-size", size, "--max-size",
            size, "--warmup-iters", "100"]  # the study's and the miniature's, whatever the quick start's
    results, t0, runs = {}, time.time(), 0
    for name in variants:
        results[name] = []
        for seed in range(seeds_of(name)):
            out = os.path.join(args.out, "ablate", f"{recipe}-{args.iters}", level, name, f"seed{seed}")
            spent, done = time.time() - t0, os.path.exists(os.path.join(out, "result.json"))
            if not done and args.report_only:
                print(f"{name} seed {seed}: not run yet (--report-only)")
                continue
            if not done and runs and args.budget_minutes and spent + spent / runs > 60 * args.budget_minutes:
                print(f"{name} seed {seed}: skipped, over --budget-minutes {args.budget_minutes:g} (rerun to continue)")
                continue
            curve = ["--eval-at", *map(str, evals)] if name in ("b", "d") else []  # AP against iterations
            flags = base + curve + ["--data", data, "--seed", str(seed)] + VARIANTS[name][2] + args.train_args.split()
            results[name].append({"seed": seed, **train_run(out, flags)})
            runs += not done  # runs trained now: what the budget estimate divides by
            print(f"{level} {name} seed {seed}: {results[name][-1].get('stats', results[name][-1]).get('AP', '')}")
    return results


MINIATURE_MINUTES = 40  # the default `ablate` stops starting runs that would end past this; rerun to continue


def cmd_ablate(args):
    if args.budget_minutes is None and args.preset != "dense":
        args.budget_minutes = MINIATURE_MINUTES
    level, seeds = "dense" if args.preset == "dense" else "shapes", args.seeds or (3 if args.preset == "dense" else 1)
    results = study(args, args.preset, level, args.variants, lambda v: seeds if v in MAIN else args.other_seeds or 1)
    rows = {k: {"paper": VARIANTS[k][0], "loss": VARIANTS[k][1], **summarize(r)} for k, r in results.items() if r}
    lines = ["| | paper | loss | seeds | AP | AP50 | AP75 | APs |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        seeds_cell = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        lines.append(f"| ({k}) | {r['paper']} | {r['loss']} | {seeds_cell} | " + " | ".join(fmt(r[m]) for m in METRICS)
                     + " |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    done = {k: r for k, r in rows.items() if r["AP"]}
    ax1.barh([f"({k}) {r['loss']}" for k, r in done.items()], [r["AP"][0] for r in done.values()],
             xerr=[r["AP"][1] or 0 for r in done.values()], capsize=3)
    ax1.invert_yaxis()
    ax1.set(xlabel="COCO AP (mean ± std over seeds)", title=f"Table 1 on {level}, {args.iters} iterations")
    for k in results:  # AP against iterations, mean and spread over seeds
        curves = [{row["iter"]: row["eval"]["AP"] for row in r["curve"]} for r in results[k] if "curve" in r]
        its = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if len(its) > 1:
            ap = np.array([[c[i] for i in its] for c in curves])
            ax2.plot(its, ap.mean(0), marker="o", label=f"({k}) {VARIANTS[k][1]}")
            ax2.fill_between(its, ap.min(0), ap.max(0), alpha=0.2)
    ax2.set(xlabel="iteration", ylabel="COCO AP (band: min to max over seeds)", title="AP against iterations")
    ax2.legend()
    imbalance = level_data(level, args.data, write=False)[1] if args.preset == "dense" else None
    table = {"level": level, "recipe": args.preset, "iters": args.iters, "imbalance": imbalance,
             "rows": rows, "runs": results, "markdown": "\n".join(lines)}
    D.save_figure(fig, args.out, f"ablate_{args.preset}", table)  # the study and the miniature side by side
    plt.close(fig)
    print("\n".join(lines))
    return table


def cmd_sweep(args):
    """(b) against (d) at each level: AP of each and their paired gap (the same seed: the same init and batches)."""
    if args.data:
        raise ValueError("sweep: every level has its own set (ablate.LEVELS); --data is for ablate")
    seeds, table, lines = args.seeds or 3, {}, ["| level | classes | negative anchors per positive | negative "
                                                "samples per positive | (b) CE AP | (d) FL AP | FL − CE |",
                                                "|---|---|---|---|---|---|---|"]
    for level in args.levels:
        results = study(args, "dense", level, ["b", "d"], lambda v: seeds)
        ap = {v: {r["seed"]: r["stats"]["AP"] for r in results[v] if "stats" in r} for v in "bd"}
        paired = sorted(set(ap["b"]) & set(ap["d"]))  # seeds where both trained: the same init and batches
        gaps = [ap["d"][s] - ap["b"][s] for s in paired]
        diverged = {v: [r["seed"] for r in results[v] if "diverged" in r] for v in "bd"}
        imbalance = level_data(level, write=False)[1]
        table[level] = {"imbalance": imbalance, "b": ap["b"], "d": ap["d"], "gap": dict(zip(paired, gaps)),
                        "diverged": diverged, "gap_mean_std": mean_std(gaps)}
        note = "".join(f" (({v}) diverged: seeds {s})" for v, s in diverged.items() if s)
        lines.append(f"| {level} | {imbalance['classes']} | {imbalance['negative_anchors_per_positive']:.0f} | "
                     f"{imbalance['negative_samples_per_positive']:,.0f} | {fmt(mean_std(list(ap['b'].values())))} | "
                     f"{fmt(mean_std(list(ap['d'].values())))} | {fmt(mean_std(gaps))}{note} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    shown = {k: t for k, t in table.items() if t["gap_mean_std"]}
    x = [t["imbalance"]["negative_samples_per_positive"] for t in shown.values()]
    ax.errorbar(x, [t["gap_mean_std"][0] for t in shown.values()],
                yerr=[t["gap_mean_std"][1] or 0 for t in shown.values()], marker="o", capsize=4)
    for xi, (level, t) in zip(x, shown.items()):
        ax.annotate(level, (xi, t["gap_mean_std"][0]), textcoords="offset points", xytext=(5, 5))
    ax.axhline(0, color="0.6", lw=1)
    ax.set(xscale="log", xlabel="negative (anchor, class) samples per positive", ylabel="AP of FL − AP of CE",
           title=f"FL γ=2 against CE with the prior, {args.iters} iterations, up to {seeds} seeds")
    D.save_figure(fig, args.out, "sweep", {"iters": args.iters, "levels": table, "markdown": "\n".join(lines)})
    plt.close(fig)
    print("\n".join(lines))
    return table


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None) if values else None

"""Table 1 at the endpoint (§5.1; Table 1a, 1b, 1d): every row trained long, at a learning rate chosen for
its loss family on held-out training pictures, and the table says whether its AP had stopped rising.
Run through analyze.py:

    python analyze.py endpoint --stage lr        # (b) and (d) at three LRs, seed 0: each family's LR
    python analyze.py endpoint                   # then every row at its family's LR, 2-3 seeds
    python analyze.py endpoint --report-only     # the tables and figures of the runs finished so far

- Every run trains on the dense set's training pictures less HOLDOUT held out (data.holdout_split).
  Decisions look only at the held-out pictures: each family's LR, and whether a run reached its
  endpoint. The table reports the val pictures, which no decision saw.
- A run of T iterations drops its LR x0.1 at 75% and 90% (§4.1's shape), is evaluated on the held-out
  pictures at T/8, 2T/8, ..., T, and has reached its endpoint when that AP gained less than ENDPOINT_GAIN
  over its last quarter (from 6T/8 to T).
- LR: (b) CE with the prior and (d) FL γ = 2 at LRS per 16 images (the paper's 0.01, 2x, 4x), seed 0.
  CE-family rows take (b)'s best, FL rows (d)'s; the LR runs at the chosen LRs are seed 0 of (b), (d).
- A finished run's result goes into LEDGER (committed, since runs/ is not): a finished run is never
  rerun, in this session or a later one; an interrupted one resumes from its checkpoint under runs/.
- The study is 12 CPU-hours (STUDY_HOURS, counted from the ledger's seconds): no run starts that would end
  past them, and the rows the issue cuts first run last (table1.ORDER). The runs are on FORM, a cheaper
  form of the dense set with the same negatives per positive (docs/study.md, "The schedule and form").
"""
import hashlib
import json
import os
import platform
import time

import torch

import data as D
import weights as W
from engine import read_metrics
from evaluate import STATS, evaluate
from loss import MONITOR
from study import ablate, dense
from study.table1 import ORDER, ROWS, SEEDS, curve, figure, pull_at_prior

ITERS, HOLDOUT, ENDPOINT_GAIN, LRS = 4000, 500, 0.01, (0.01, 0.02, 0.04)
STUDY_HOURS = 12  # the budget: no run starts that would end past it, counting every run in the ledger
# The study's form of the dense set: 160 px, not the dense recipe's 192, with the anchors x5/6 and the same
# strides, so the imbalance stays (dense.imbalance: 22,482 negative samples per positive, 192 px: 22,327; 748
# negative anchors per positive, 743) at 0.80x the seconds an iteration: more iterations in the 12 hours
# (docs/study.md, "The schedule and form, revised"). The first LR runs (2,400 iterations, in the ledger) were
# at 192 px: pilots now, which `--iters 2400` no longer matches (their flags lack FORM).
SIZE, ANCHORS = 160, (13, 27, 53, 107, 213)
FORM = ["--min-size", str(SIZE), "--max-size", str(SIZE), "--anchor-sizes", *map(str, ANCHORS)]
LEDGER = "docs/study/endpoint_runs.json"


def eval_points(iters):
    return [iters * k // 8 for k in range(1, 9)]


def study_hours(done, iters):
    """The ledger's hours of training, and one more run of `iters` at its trained runs' mean: where the next
    run would end. (A run resumed in a session counts its last part; one cut by a session's end, nothing.)"""
    runs = [r["seconds"] for k, r in done.items() if k.endswith(f"/{iters}") and "stats" in r]
    return (sum(r.get("seconds", 0) for r in done.values()) + (sum(runs) / len(runs) if runs else 0)) / 3600


def endpoint_gain(curve, iters):
    """(gain, reached): the held-out AP at `iters` less that at 3/4 of it, and gain < ENDPOINT_GAIN.
    curve: [(iteration, AP)]; (None, False) while either point is missing."""
    ap = dict(curve)
    if iters not in ap or iters * 6 // 8 not in ap:
        return None, False
    gain = ap[iters] - ap[iters * 6 // 8]
    return gain, gain < ENDPOINT_GAIN


def choose_lrs(held_out):
    """Each family's LR: held_out {family: {lr: final held-out AP}} -> {family: lr}, the best AP (a tie:
    the lower LR, the paper's side). Both families the same: the whole table trains at one LR."""
    return {fam: max(aps, key=lambda lr: (aps[lr], -lr)) for fam, aps in held_out.items()}


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def ledger(path=None):
    """The finished runs: {key(row, lr, seed, iters): result}."""
    path = path or LEDGER
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def key(row, lr, seed, iters):
    return f"{row}/lr{lr:g}/seed{seed}/{iters}"


def run_flags(args, data, row, lr, seed):
    """train.py's flags of one run: fit on the training pictures less the held-out ones, evaluate on those."""
    fit, held = D.holdout_split(data, holdout=HOLDOUT)
    images, it = D.coco_paths(data, "train")[1], args.iters
    return ["--preset", "dense", "--data", data, "--iters", str(it), "--steps", str(it * 3 // 4), str(it * 9 // 10),
            "--warmup-iters", "100", "--ckpt-every", str(it // 8), "--lr", str(lr), "--seed", str(seed),
            "--train-ann", fit, "--train-images", images, "--val-ann", held, "--val-images", images,
            "--eval-at", *map(str, eval_points(it)[:-1]), *FORM, *ROWS[row][5], *args.train_args.split()]


def run(args, data, row, lr, seed):
    """One run (ablate.train_run: resumable), evaluated on val when it ends; its result in the ledger.
    A run in the ledger is not run again; one there with other flags is refused (another study's)."""
    done = ledger(args.ledger)
    k = key(row, lr, seed, args.iters)
    if args.report_only:
        return done.get(k)
    flags = run_flags(args, data, row, lr, seed)
    if k in done:
        if done[k]["flags"] != flags:
            raise ValueError(f"{args.ledger}: {k} was trained with other flags (its 'flags' there); choose another "
                             "--ledger")
        return done[k]
    on = flags[flags.index("--device") + 1] if "--device" in flags else "cuda" if torch.cuda.is_available() else "cpu"
    out, t0 = os.path.join(args.out, "endpoint", k), time.time()
    result = ablate.train_run(out, flags)
    if "stats" in result:  # the table's number: the val pictures, seen by no decision
        ann, val_images = D.coco_paths(data, "val")
        model = W.load_checkpoint(os.path.join(out, "checkpoint.pt"), on)  # train.py's device
        val = evaluate(model, D.CocoDetection(ann, val_images))
        result["val"] = {k: val[k] for k in STATS}  # the ledger is committed: the 12 numbers, no per-class table
        rows = [r for r in read_metrics(out) if "eval" not in r]  # the training log, by column (compact)
        result["log"] = {m: [r.get(m) for r in rows] for m in ("iter", "cls", "box", "lr", *MONITOR)}
    chip = torch.cuda.get_device_name(on) if on != "cpu" else torch.backends.cpu.get_cpu_capability()
    result.update(flags=flags, seconds=round(time.time() - t0), host=f"{platform.processor() or platform.machine()} "
                  f"{chip}", backbone=digest(dense.BACKBONE),
                  train_ann=digest(D.coco_paths(data, "train")[0]),
                  negative_samples_per_positive=args.imbalance["negative_samples_per_positive"])
    done = ledger(args.ledger)  # again: another process may have added runs meanwhile
    done[k] = rounded(result)
    os.makedirs(os.path.dirname(args.ledger) or ".", exist_ok=True)
    D.write_json(args.ledger, done)
    return result


def rounded(obj, digits=4):
    """obj with every float to `digits` significant digits: the ledger stays small (it is committed)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    return [rounded(v, digits) for v in obj] if isinstance(obj, list) else obj


def gain_text(result, it):
    gain = endpoint_gain(curve(result), it)[0]
    return "–" if gain is None else f"{gain:+.3f}"


def plan(args):
    """The runs of a stage in order: [(row, lr, seed)]. The table's needs the LR stage's choice."""
    if args.stage == "lr":
        return [(row, lr, 0) for lr in reversed(LRS) for row in ("b", "d")]  # 0.04: the 800-iteration study's
    lrs = given_lrs(args) or chosen(ledger(args.ledger), args.iters)
    # What is cut last runs first, except that (b) and (d) alternate seed by seed: each seed's pair trains in one
    # session, on one host's backbone (pretrain.py's weights differ from host to host), so FL - CE pairs on it.
    runs = [(row, lrs[ROWS[row][4]], s) for row in args.rows for s in range(SEEDS.get(row, 2))
            if getattr(args, "seed", None) in (None, s)] if lrs else []
    return sorted(runs, key=lambda r: (0, r[2], ORDER.index(r[0])) if r[0] in ("b", "d") else
                  (1, ORDER.index(r[0]), r[2]))


def given_lrs(args):
    """--lrs CE FL: each family's LR given, not chosen by the LR stage of this ledger (a block of runs on another
    device at the LRs that the CPU study chose, say); else None."""
    return dict(zip(("CE", "FL"), args.lrs)) if getattr(args, "lrs", None) else None


def chosen(done, iters):
    """Each family's LR from the LR stage's held-out APs, once all of its runs have finished; else None."""
    held = {fam: {lr: done[key(row, lr, 0, iters)].get("stats", {}).get("AP", -1.0) for lr in LRS
                  if key(row, lr, 0, iters) in done} for fam, row in (("CE", "b"), ("FL", "d"))}
    return choose_lrs(held) if all(len(v) == len(LRS) for v in held.values()) else None


def cmd_endpoint(args):
    args.ledger = getattr(args, "ledger", None) or LEDGER
    args.rows = getattr(args, "rows", None) or list(ROWS)
    if args.iters < 8:
        raise ValueError(f"endpoint: --iters {args.iters}: at least 8 (an evaluation at every eighth)")
    try:
        data, args.imbalance = ablate.level_data("dense", args.data, not args.report_only, SIZE, ANCHORS)
    except ValueError:  # --report-only on a clone without the set: the ledger is enough
        data, args.imbalance = None, None
    t0, trained = time.time(), 0
    stages = ["lr", "table"] if args.stage == "all" else [args.stage]
    for stage in stages:
        args.stage = stage
        todo = plan(args)
        if stage == "table" and not todo:
            print("the table waits for the LR stage: (b) and (d) at every LR of LRS")
        for row, lr, seed in todo:
            spent = time.time() - t0
            if not args.report_only and trained and args.budget_minutes and spent + spent / trained > 60 * \
                    args.budget_minutes:
                print(f"{row} lr {lr:g} seed {seed}: not started, over --budget-minutes (rerun to continue)")
                break
            new = key(row, lr, seed, args.iters) not in ledger(args.ledger)
            if new and not args.report_only and (hours := study_hours(ledger(args.ledger), args.iters)) > STUDY_HOURS:
                print(f"{row} lr {lr:g} seed {seed}: not started, the study's {STUDY_HOURS} hours are spent "
                      f"({hours:.2f} with it): the rows after it are cut")
                break
            result = run(args, data, row, lr, seed)
            trained += bool(new and result)
            if result:
                print(f"{row} lr {lr:g} seed {seed}: held-out AP {result.get('stats', {}).get('AP')}, val AP "
                      f"{result.get('val', {}).get('AP')}, gain over the last quarter {gain_text(result, args.iters)}")
    return report(args)


def report(args):
    """tables() of the ledger, written to OUT/endpoint.json, with the figures; printed."""
    done = ledger(args.ledger)
    out = tables(done, args.iters, args.imbalance and args.imbalance["negative_samples_per_positive"], given_lrs(args))
    figure(done, args.iters, args.out, out["lrs"])
    D.write_json(os.path.join(args.out, "endpoint.json"), out)
    print(out["lr_markdown"] + "\n\n" + out["markdown"])
    return out


def pull(row, negatives):
    """table1.pull_at_prior of a row's loss (None for OHEM, which samples): > 1, the scores start down."""
    flags = dict(zip(ROWS[row][5][::2], ROWS[row][5][1::2]))
    if "--ohem" in flags:
        return None
    alpha = None if flags.get("--alpha") == "none" else float(flags.get("--alpha", 0.25))
    return pull_at_prior(float(flags["--gamma"]), alpha, negatives, float(flags.get("--prior", 0.01)))


def tables(done, it=ITERS, negatives=None, lrs=None):
    """The LR table, and Table 1 beside the paper's with AP relative to FL γ = 2 for both (the app's too),
    with a column of each loss's pull at the prior for `negatives` negative samples per positive (default:
    the ledger's, as its runs counted them). lrs: each family's LR, if not the LR stage's choice (--lrs)."""
    negatives = negatives or next((r["negative_samples_per_positive"] for k, r in done.items()
                                   if k.endswith(f"/{it}") and "negative_samples_per_positive" in r), None)
    lines = ["| LR per 16 images | " + " | ".join(f"{lr:g}" for lr in LRS) + " |", "|---" * (len(LRS) + 1) + "|"]
    for row in ("b", "d"):
        cells = [done.get(key(row, lr, 0, it), {}) for lr in LRS]
        lines.append(f"| ({row}) held-out AP (gain over the last quarter) | " + " | ".join(
            f"{r['stats']['AP']:.3f} ({gain_text(r, it)})" if "stats" in r else ("diverged" if r else "–")
            for r in cells) + " |")
    # pretrain.py's backbone is not bitwise the same from host to host (AVX2 / AVX-512): say which each run had
    lines.append("| backbone, (b) / (d) | " + " | ".join(" / ".join(done.get(key(row, lr, 0, it), {}).get(
        "backbone", "–")[:6] for row in "bd") for lr in LRS) + " |")
    lrs = lrs or chosen(done, it)
    table = ["| | loss | paper AP | paper, relative to FL γ = 2 | LR | seeds | val AP | relative to FL γ = 2 | "
             "endpoint (held-out gain, last quarter) |" + (" negatives' pull at the prior |" if negatives else ""),
             "|---" * (10 if negatives else 9) + "|"]
    rows = {}
    for row, (_, _, _, _, fam, _) in ROWS.items():
        lr = lrs[fam] if lrs else None
        runs = [done[k] for s in range(SEEDS.get(row, 2)) if lr and (k := key(row, lr, s, it)) in done]
        trained = [r for r in runs if "val" in r]
        rows[row] = {"lr": lr, "seeds": len(runs), "diverged": len(runs) - len(trained),
                     "AP": ablate.mean_std([r["val"]["AP"] for r in trained]),
                     "endpoint": [endpoint_gain(curve(r), it) for r in trained]}
    ref = rows["d"]["AP"]
    for row, (loss, where, paper, paper_fl, _, _) in ROWS.items():
        r = rows[row]
        ours = f"{r['AP'][0] / ref[0]:.2f}" if r["AP"] and ref and ref[0] > 0 else "–"
        end = ", ".join("yes" if ok else "not evaluated at 3/4" if g is None else f"not reached ({g:+.3f})"
                        for g, ok in r["endpoint"]) or "–"
        seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        paper_rel = f"{paper / paper_fl:.2f}" if paper else "–"
        table.append(f"| ({row}) | {loss} | {paper or where} | {paper_rel} | {r['lr'] or '–'} | {seeds} | "
                     f"{ablate.fmt(r['AP'])} | {ours} | {end} |" + (f" {p:.3g} |" if (p := negatives and pull(
                         row, negatives)) else " – |" if negatives else ""))
    return {"iters": it, "lrs": lrs, "rows": rows, "lr_markdown": "\n".join(lines), "markdown": "\n".join(table)}


def summary(done=None):
    """Both tables of the ledger's runs in markdown, titled (the app's Focal loss tab)."""
    out = tables(ledger() if done is None else done)
    return (f"### Table 1 at the endpoint (`analyze.py endpoint`), {out['iters']} iterations a run, each family's "
            f"LR chosen on held-out pictures\n\n{out['markdown']}\n\nThe LR stage:\n\n{out['lr_markdown']}")

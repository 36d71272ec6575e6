"""Table 1's rows (§5.1; Table 1a, 1b, 1d): the paper's AP of each, and the train.py flags that make it on the
dense set; each loss's pull at the prior (a column of the table); and the figure of their runs (AP against
iterations, the classifier's log). endpoint.py trains them; its tables put each beside the paper's, relative to
FL γ = 2.

A row's family (CE or FL) decides which learning rate it takes: the one chosen for (b) CE with the prior,
or for (d) FL γ = 2 (endpoint.chosen).
"""
import math

import matplotlib.pyplot as plt
import torch

import data as D
from loss import focal_loss

CE, FL = ("--gamma", "0", "--alpha", "none"), ("--alpha", "0.25")
ROWS = {  # name -> (loss, the paper's row, its AP, that table's FL γ = 2 AP, family, train.py flags); §5.1
    "a": ("CE, bias 0 (no prior)", "§3.3: diverges", None, 34.0, "CE", [*CE, "--prior", "0.5"]),
    "b": ("CE, prior π = .01", "§3.3 (= Table 1a α = .5 ×2)", 30.2, 34.0, "CE", [*CE]),
    "c.25": ("α-CE, α = .25", "Table 1a", 10.8, 34.0, "CE", ["--gamma", "0", "--alpha", "0.25"]),
    "c.5": ("α-CE, α = .5", "Table 1a", 30.2, 34.0, "CE", ["--gamma", "0", "--alpha", "0.5"]),
    "c": ("α-CE, α = .75", "Table 1a, 1b γ = 0", 31.1, 34.0, "CE", ["--gamma", "0", "--alpha", "0.75"]),
    "c.9": ("α-CE, α = .9", "Table 1a", 30.8, 34.0, "CE", ["--gamma", "0", "--alpha", "0.9"]),
    "e0.5": ("FL γ = .5, α = .5", "Table 1b", 32.9, 34.0, "FL", ["--gamma", "0.5", "--alpha", "0.5"]),
    "e1": ("FL γ = 1, α = .25", "Table 1b", 33.7, 34.0, "FL", ["--gamma", "1", *FL]),
    "d": ("FL γ = 2, α = .25", "Table 1b", 34.0, 34.0, "FL", ["--gamma", "2", *FL]),
    "e5": ("FL γ = 5, α = .25", "Table 1b", 32.2, 34.0, "FL", ["--gamma", "5", *FL]),
    "g": ("OHEM, no ratio, 128, NMS .5", "Table 1d (R101)", 32.8, 36.0, "CE", [*CE, "--ohem", "inf"]),
    "f": ("OHEM 1:3, 128, NMS .5", "Table 1d (R101)", 31.1, 36.0, "CE", [*CE, "--ohem", "3"]),
}
SEEDS = {"b": 3, "c": 3, "d": 3}  # the others: 2
# The order the table's runs go in: (b) and (d) first, then the rows the issue would cut last if the study ran
# over its 12 hours (cut first: e0.5, then e5, the α grid, OHEM 1:3), so that a budget that runs out cuts them.
ORDER = ("b", "d", "c", "e1", "a", "g", "f", "c.9", "c.5", "c.25", "e5", "e0.5")


def pull_at_prior(gamma, alpha, negatives_per_positive, prior=0.01):
    """How much harder the negatives pull every score down than the positives pull theirs up at the start of
    training (§3.3): Σ|∂FL/∂x| over a positive's negative samples over its own, every logit at the prior's."""
    x = torch.full((2,), -math.log((1 - prior) / prior), dtype=torch.float64, requires_grad=True)  # §3.3
    focal_loss(x, torch.tensor([1.0, 0.0], dtype=torch.float64), alpha, gamma).backward()  # a positive, a negative
    positive, negative = x.grad.abs().tolist()
    return negatives_per_positive * negative / positive


def curve(result):
    """A run's held-out AP against iterations: [(iteration, AP)]."""
    return [(r["iter"], r["eval"]["AP"]) for r in result.get("curve", [])]


def figure(done, iters, out, lrs):
    """AP against iterations (held-out) of every run of `iters` in the ledger `done`, and the classifier's log
    side by side (§3.2-3.3), to out/endpoint.png."""
    runs = {k: r for k, r in done.items() if k.endswith(f"/{iters}") and "log" in r}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    panels = [("AP", "held-out COCO AP"), ("cls", "class loss"), ("box", "box loss"), ("pos_logit", "mean logit, "
              "positives"), ("neg_logit", "mean logit, negatives"), ("scored_above_0.05", "anchors scored > .05")]
    styles = {}  # one style a (row, LR), its seeds in it: seed 0 labelled and bold, the others thin
    for k, r in sorted(runs.items()):
        row, lr, seed, _ = k.split("/")
        label, seed0 = f"({row}) LR {lr[2:]}", seed == "seed0"
        n = styles.setdefault(label, len(styles))
        colour, dashes = f"C{n % 10}", "-" if n < 10 else "--"  # past ten (row, LR)s the colours come round dashed
        for ax, (m, title) in zip(axes.flat, panels):
            points = curve(r) if m == "AP" else [(i, v) for i, v in zip(r["log"]["iter"], r["log"][m]) if v is not None]
            if not points:
                continue
            ax.plot(*zip(*points), dashes, color=colour, lw=1.2 if seed0 else 0.6, alpha=1 if seed0 else 0.5,
                    label=label if seed0 else None)
            ax.set(title=title, xlabel="iteration")
    axes[0, 1].set_yscale("log")  # CE's class loss starts near 10, FL's near 1
    axes[1, 2].set_yscale("log")
    axes[0, 0].legend(fontsize=7, title="seed 0; thin: seeds 1-2", title_fontsize=7)
    D.save_figure(fig, out, "endpoint", {"lrs": lrs, "runs": sorted(runs)})
    plt.close(fig)

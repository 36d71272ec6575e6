"""A training run's state on disk: checkpoints, resume, and the metrics log (train.py's, §4.1).

A checkpoint holds everything a run needs to continue (model, optimizer, scheduler, AMP scaler,
iteration, RNG states, ModelConfig, arguments), is written to a temporary name and renamed, and is
never written with non-finite weights. On a CPU, `train.py --resume` continues bit for bit; on CUDA
only with --deterministic (see README). metrics.jsonl has one row per logged iteration.
"""
import json
import os
from dataclasses import asdict

import torch

import data as D


def save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, args):
    """Everything a run needs to continue, written to a temporary name and renamed: never half-written."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration, "config": asdict(model.cfg), "args": vars(args),
             "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}
    D.write_atomic(path, lambda tmp: torch.save(state, tmp))


def check_finite(model, iteration, last_good):
    """FloatingPointError unless every weight is finite: a checkpoint is never written with NaN weights."""
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad:
        raise FloatingPointError(f"iteration {iteration}: {bad} is not finite; stopped. Last good checkpoint: "
                                 f"{last_good or 'none written yet'}")


def restore(path, model, optimizer, scheduler, scaler, device):
    """Load a run's checkpoint into its model, optimizer, scheduler, scaler and RNGs; returns its iteration.
    Read onto the CPU (the RNG states must stay CPU tensors), then each part copies to its device."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # moves the momentum buffers to the parameters' device
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt["scaler"]:  # a run without AMP saved an empty scaler state
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        print(f"{path}: no AMP loss scale saved (a float32 run); starting from the default scale")
    torch.set_rng_state(ckpt["rng"]["torch"])
    index = (torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else -1
    if 0 <= index < len(ckpt["rng"]["cuda"]):
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][index], index)
    return ckpt["iteration"]


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
    import matplotlib

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

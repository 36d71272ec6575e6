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


def save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, args):
    """Everything a run needs to continue, written to a temporary name and renamed: never half-written."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration, "config": asdict(model.cfg), "args": vars(args),
             "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    if device.type == "cuda" and device.index is not None and device.index < len(ckpt["rng"]["cuda"]):
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][device.index], device)
    return ckpt["iteration"]


def keep_metrics_until(run_dir, iteration):
    """Drop the metrics.jsonl rows after `iteration` (logged after the last checkpoint, before a crash),
    so that a resumed run's log has each iteration once."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["iter"] <= iteration]
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


def plot_losses(run_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "cls", "box"):
        ax.plot([r["iter"] for r in rows], [r[key] for r in rows], label=key)
    ax.set(xlabel="iteration", ylabel="loss", yscale="log", title=os.path.basename(os.path.abspath(run_dir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "loss.png"), dpi=100)
    plt.close(fig)

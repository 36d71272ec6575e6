"""Fig. 4 of the paper on any checkpoint (§5.1 "Analysis of the Focal Loss"), and where the loss goes (§3.2).

The model runs over a dataset, anchors are assigned as in training (loss.assign_targets), and the
true-class logit z of every positive and (a uniform sample of) every negative (anchor, class) sample
outside the ignore band is kept, sorted from easy to hard: FL decreases with z for every gamma >= 0,
so one sort serves every gamma. From it: the cumulative normalised loss of Fig. 4 (cdf, fig4) and the
share of the loss and of its gradient each band of p_t carries (where_the_loss_goes). analyze.py's
`cdf` command and app.py's Focal loss tab draw from the same cache.

    python analyze.py cdf                            # the quick start's model on the shapes val split
"""
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

import data as D
import model as M
from evaluate import model_labels
from loss import LossConfig, assign_targets, fused_focal_loss

BANDS = (0.5, 0.9, 0.99)  # the p_t edges of the negative bands loss_shares reports


def focal_values(z, gamma, alpha=None):
    """FL of samples whose true-class logit is z (p_t = sigmoid(z)), by loss.py's fused_focal_loss: training's
    values, accurate where 1 - p_t is tiny (the plain form's 1 - sigmoid(z) rounds there)."""
    z = torch.as_tensor(z, dtype=torch.float32)
    return fused_focal_loss(z, torch.ones_like(z), alpha=alpha, gamma=gamma).numpy()


def loss_shares(z_pos, z_neg, gamma, alpha=None, neg_weight=1.0, edges=BANDS):
    """Where FL and its gradient go (§3.2's argument, measured): the share of the classification loss and
    of Σ|∂FL/∂z| carried by the positive samples and by the negatives in each band of p_t = sigmoid(z),
    z each sample's true-class logit (x for a positive, -x for a negative). neg_weight: how many
    negatives each given one stands for (a uniform sample). Returns {"loss": {band: share}, "grad": ...}."""
    out = {}
    for name, z, t in (("pos", z_pos, 1.0), ("neg", z_neg, 0.0)):
        x = (torch.as_tensor(z, dtype=torch.float64).flatten() * (1 if t else -1)).requires_grad_()  # the logit
        loss = fused_focal_loss(x, torch.full_like(x, t), alpha, float(gamma))
        loss.sum().backward()  # each sample's own gradient: the loss is a sum over samples
        out[name] = (x.detach() * (1 if t else -1), loss.detach(), x.grad.abs())
    z, loss, grad = out["neg"]
    p_t = torch.sigmoid(z)
    names = [f"negatives p_t <= {edges[0]:g}"] + [f"negatives {a:g} < p_t <= {b:g}" for a, b in zip(edges, edges[1:])]
    masks = [p_t <= edges[0]] + [(p_t > a) & (p_t <= b) for a, b in zip(edges, edges[1:])]
    names, masks = names + [f"negatives p_t > {edges[-1]:g}"], masks + [p_t > edges[-1]]
    shares = {}
    for key, values in (("loss", loss), ("grad", grad)):
        parts = {"positives": out["pos"][1 if key == "loss" else 2].sum().item()}
        parts.update({n: neg_weight * values[m].sum().item() for n, m in zip(names, masks)})
        total = sum(parts.values()) or 1.0
        shares[key] = {n: v / total for n, v in parts.items()}
    return shares


class UniformSample:
    """At most `cap` of all the values added, each kept with the same chance: every value gets a random
    key and the cap smallest keys win (a per-batch cap would favour the samples of small batches)."""

    def __init__(self, cap, seed=0):
        self.cap, self.seen, self.g = cap, 0, torch.Generator().manual_seed(seed)
        self.values, self.keys = torch.empty(0), torch.empty(0)

    def add(self, values):
        values = values.flatten().float().cpu()
        self.seen += len(values)
        self.values = torch.cat([self.values, values])
        self.keys = torch.cat([self.keys, torch.rand(len(values), generator=self.g)])
        if len(self.values) > 2 * self.cap:  # prune now and then: amortised, the pool stays under 2 x cap
            self._prune()

    def _prune(self):
        if len(self.values) > self.cap:
            keep = self.keys.topk(self.cap, largest=False).indices
            self.values, self.keys = self.values[keep], self.keys[keep]

    def result(self):
        self._prune()
        return self.values


@torch.inference_mode()
def collect_logits(model, ds, batch_size=8, max_images=None, max_negatives=10**7, progress=tqdm, assign=None):
    """Run the model over ds and assign anchors as training does (assign: the LossConfig of its IoU thresholds,
    default the paper's; weights.load_loss_config gives a checkpoint's). Returns the true-class logit z of
    every positive and every negative (anchor, class) sample outside the ignore band (p_t =
    sigmoid(z)), each sorted from easy to hard: FL decreases with z for every gamma >= 0, so this
    one order serves every gamma. Images are batched only with images of their padded size (as detect
    does) and only their own anchors count (centre inside the image, not over padding), so the result
    does not depend on batch_size. Beyond max_negatives,
    the negatives are a uniform sample (as Fig. 4's); "neg_weight" is how many each stands for."""
    cfg, device, assign = model.cfg, M.model_device(model), assign or LossConfig()
    count = len(ds) if max_images is None else min(len(ds), max_images)
    if count == 0:
        raise ValueError("the dataset has no images")
    pos, neg = [], UniformSample(max_negatives)
    fill = tuple(round(255 * m) for m in cfg.pixel_mean)
    d, to_model = cfg.size_divisible, model_labels(cfg, ds).to(device)  # (K_dataset,) the model's label of each
    for start in progress(range(0, count, batch_size), total=-(-count // batch_size)):
        groups = {}  # as detect batches: images of one padded size together (GroupNorm sees the padding)
        for i in range(start, min(start + batch_size, count)):
            item = ds[i]
            groups.setdefault(tuple(-(-s // d) * d for s in item[0].shape[1:]), []).append(item)
        for items in groups.values():
            images, targets = D.collate(items, d, fill)
            cls_logits, _ = model(M.normalize(images.to(device), cfg))
            anchors, _ = M.make_anchors(cfg, images.shape[-2:], device)
            _, _, onehot, keep = assign_targets(anchors, [t["boxes"].to(device) for t in targets],
                                                [to_model[t["labels"].to(device)] for t in targets], cfg.num_classes,
                                                assign.fg_iou, assign.bg_iou, assign.low_quality_matches)
            cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
            inside = torch.stack([(cx < w) & (cy < h) for h, w in (t["size"] for t in targets)])  # (N, R)
            onehot, keep = onehot.bool(), (keep & inside).unsqueeze(-1)
            pos.append(cls_logits[onehot & keep].float().cpu().numpy())
            neg.add(-cls_logits[~onehot & keep])
    negatives = neg.result().numpy()
    pos, negatives = (-np.sort(-x) for x in (np.concatenate(pos), negatives))  # descending z: easy first
    if not len(pos):
        raise ValueError("no positive anchors: the images have no boxes")
    return {"pos": pos, "neg": negatives, "images": count, "negatives_seen": neg.seen,
            "neg_weight": neg.seen / max(len(negatives), 1)}


def load_or_collect(model, ds, cache, key, **kw):
    """The cached logits for `key` (checkpoint and data), or a fresh model run saved to `cache`."""
    if cache and os.path.exists(cache):
        with np.load(cache) as f:
            if str(f["key"]) == key:
                return {k: f[k] if f[k].ndim else f[k].item() for k in f.files if k != "key"}
    run = collect_logits(model, ds, **kw)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        D.write_atomic(cache, lambda tmp: np.savez(tmp, key=key, **run))
    return run


def cache_key(weights, ann_file, max_images, max_negatives=10**7):
    """What the cached logits depend on: checkpoint, annotations, image and negative caps, and this code's
    version of collect_logits (2: only each image's own anchors, a uniform sample over all negatives)."""
    stamp = [(os.path.abspath(p), os.path.getmtime(p)) for p in (weights, ann_file) if os.path.exists(p)]
    return json.dumps(["collect_logits v2", weights, ann_file, stamp, max_images, max_negatives])


def cdf(z, gamma, points=1000):
    """Fig. 4: normalised FL of samples sorted low to high, cumulated. Returns (fraction, cdf) at
    `points` evenly spaced fractions, and the shares of the loss the hardest 20% and 1% carry."""
    loss = focal_values(z, gamma).astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(loss)])
    cum /= cum[-1] if cum[-1] > 0 else 1.0
    frac = np.linspace(0, 1, points)
    shares = {f"hardest {p:.0%}": float(1 - cum[int(round((1 - p) * len(loss)))]) for p in (0.2, 0.01)}
    return frac, cum[np.round(frac * len(loss)).astype(int)], shares


def where_the_loss_goes(run, gammas, alpha=None):
    """loss_shares of the collected samples for each gamma (0: CE): the share of the loss and of its
    gradient that the positives and each band of negatives carry, the negatives weighted as sampled."""
    weight = run.get("neg_weight", run["negatives_seen"] / max(len(run["neg"]), 1))
    return {f"{g:g}": loss_shares(run["pos"], run["neg"], g, alpha, weight) for g in gammas}


def easy_share(shares, edge=0.9):
    """The part of a loss_shares split carried by the negatives with p_t above edge (one of BANDS)."""
    def lower(band):  # "negatives 0.9 < p_t <= 0.99" -> 0.9, "negatives p_t > 0.99" -> 0.99, else None
        words = band.split()
        return float(words[1]) if words[2:3] == ["<"] else float(words[-1]) if ">" in words else None

    return sum(v for band, v in shares.items() if (lo := lower(band)) is not None and lo >= edge)


def fig4(run, gammas, highlight=None, figsize=(10, 4)):
    """Fig. 4 as the paper draws it: the cumulative normalised loss of the foreground and of the
    background samples, sorted from easy to hard, a line for each gamma. Returns (fig, curves, shares)."""
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    curves, shares = {}, {}
    for g in gammas:
        curves[f"{g:g}"], shares[f"{g:g}"] = {}, {}
        for ax, kind in zip(axes, ("pos", "neg")):
            x, y, shares[f"{g:g}"][kind] = cdf(run[kind], g)
            curves[f"{g:g}"][kind] = y.round(5).tolist()
            bold = highlight is not None and g == highlight
            ax.plot(x, y, label=f"γ = {g:g}", lw=3 if bold else 1.5, color="black" if bold else None)
    for ax, kind in zip(axes, ("foreground", "background")):
        ax.set(xlabel=f"fraction of {kind} examples", ylabel="cumulative normalized loss", title=kind,
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    return fig, {"fraction": x.round(4).tolist(), **curves}, shares

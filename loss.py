"""Focal loss and the RetinaNet training loss (§3 "Focal Loss", §4 "Inference and Training").

    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)                          (§3.2, Eq. 5)

with p_t = p for the ground-truth class and 1 - p otherwise. gamma = 0 is alpha-balanced cross
entropy (§3.1, Eq. 3) and alpha = None drops the weighting (plain CE, Eq. 1).

The training loss sums FL over all anchors that are not ignored (~100k per image, not a sampled
subset: §3.2 / §4 "Training") and smooth L1 over the foreground anchors, and divides both by the
number of foreground anchors, as Detectron does. Everything here takes tensors: no model.

Reading order: `focal_loss` (Eq. 5 as written), `LossConfig` and `retinanet_loss` (the loss training
minimises), the anchors' targets and the box loss; then `fused_focal_loss`, the same values and
gradients computed faster on a CPU, which retinanet_loss uses; then OHEM (Table 1d's baseline)
and `monitor`, what engine.py logs of the classifier.

Shape legend: N images, R anchors, K classes, M boxes per image.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, nms

import anchors as A


def focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum"):
    """Sigmoid focal loss (§3.2, Eq. 5), written as the paper writes it. targets: 0/1, the shape of logits.
    reduction: none|mean|sum. (Its gradient is NaN where 1 - p_t rounds to 0 and gamma < 1; fused_focal_loss's
    is not.)"""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t), Eq. 1-2
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma  # (1 - p_t)^gamma: the modulating factor, Eq. 4
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss  # alpha_t, Eq. 3 and 5
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


@dataclass
class LossConfig:
    """The settings of retinanet_loss (§3, §4 "Training"), saved in checkpoints beside the ModelConfig."""

    fg_iou: float = 0.5  # §4: an anchor of IoU >= 0.5 with a box is foreground,
    bg_iou: float = 0.4  # below 0.4 background, ignored in between
    low_quality_matches: bool = True  # each box also claims its best anchors (detectron2, torchvision)
    alpha: float | None = 0.25  # §3.2, Table 1b: alpha = .25 with gamma = 2; None: no weighting
    gamma: float = 2.0
    box_loss: str = "smooth_l1"  # paper (beta 0.11); "l1" torchvision v1 / detectron2; "giou" torchvision v2
    smooth_l1_beta: float = 0.11
    ohem_ratio: float = 0.0  # > 0: OHEM instead of FL over all anchors (Table 1d's baseline); inf: no ratio


def retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=None, reduce_num_fg=None):
    """Classification and box losses of a batch, each divided by max(1, foreground anchors).

    cls_logits (N, R, K) and box_deltas (N, R, 4) as the model returns them; anchors (R, 4);
    gt_boxes / gt_labels: per-image lists of (M_i, 4) xyxy boxes and (M_i,) labels in [0, K).
    cfg: a LossConfig (default: the paper's). An image with no boxes contributes only background loss.
    cfg.ohem_ratio > 0 replaces "all anchors" by online hard example mining (Table 1d, ohem_select; the
    box loss stays on every foreground anchor, and the divisor is the same). reduce_num_fg, if given,
    maps the local foreground count to the one to divide by (engine.py all-reduces it across GPUs).
    Both losses are computed in float32, also under autocast. Returns {"cls", "box", "monitor"}: the
    monitor is for the log only (as DETR's criterion returns its class error).
    """
    cfg, (N, _, K) = cfg or LossConfig(), cls_logits.shape
    if len(gt_boxes) != N:
        raise ValueError(f"got targets for {len(gt_boxes)} images for a batch of {N}")
    matched, boxes, targets, keep = assign_targets(anchors, gt_boxes, gt_labels, K, cfg.fg_iou, cfg.bg_iou,
                                                   cfg.low_quality_matches)
    fg = matched >= 0
    num_fg = fg.sum().float()
    if reduce_num_fg is not None:
        num_fg = reduce_num_fg(num_fg)
    normalizer = num_fg.clamp(min=1.0)

    # Classification: FL summed over every anchor outside the ignore band, ~100k an image (§3.2).
    cls = fused_focal_loss(cls_logits.float(), targets, cfg.alpha, cfg.gamma, ignore=~keep)  # (N, R, K)
    if cfg.ohem_ratio:  # OHEM baseline (§5.1, Table 1d): a minibatch of the hardest examples of each image
        cls = cls * ohem_select(cls.detach().sum(-1), fg, keep, anchors, cfg.ohem_ratio).unsqueeze(-1)
    cls = cls.sum()

    # Box regression on foreground anchors only.
    n_idx, r_idx = fg.nonzero(as_tuple=True)  # F foreground anchors over the batch
    matched_boxes = boxes[n_idx, matched[n_idx, r_idx]]  # (F, 4)
    box = box_loss(cfg.box_loss, box_deltas[n_idx, r_idx].float(), anchors[r_idx], matched_boxes, cfg.smooth_l1_beta)
    return {"cls": cls / normalizer, "box": box / normalizer, "monitor": monitor(cls_logits, targets, keep)}


def assign_targets(anchors, gt_boxes, gt_labels, num_classes, fg_iou=0.5, bg_iou=0.4, low_quality=True):
    """What training asks of every anchor (§4 "Training"), for a batch; analyze.py uses it too.

    Returns matched (N, R) (box index, BACKGROUND or IGNORE), the padded boxes (N, M, 4), one-hot
    class targets (N, R, K) (all zeros for background) and keep (N, R), False in the ignore band.
    """
    N = len(gt_boxes)
    if len(gt_labels) != N:
        raise ValueError(f"got {N} box sets and {len(gt_labels)} label sets")
    boxes, labels, valid = A.pad_targets(gt_boxes, gt_labels)  # (N, M, 4), (N, M), (N, M)
    check_targets(boxes, labels, valid, num_classes)
    matched = A.match(anchors, boxes, valid, fg_iou, bg_iou, low_quality)  # (N, R)
    n_idx, r_idx = (matched >= 0).nonzero(as_tuple=True)
    targets = torch.zeros(*matched.shape, num_classes, device=anchors.device)  # (N, R, K), float: no one-hot copy
    targets[n_idx, r_idx, labels[n_idx, matched[n_idx, r_idx]]] = 1.0
    return matched, boxes, targets, matched != A.IGNORE


def check_targets(boxes, labels, valid, num_classes):
    """ValueError naming the first bad box of a padded batch: NaN/inf, x2 < x1, y2 < y1, bad label."""
    finite = torch.isfinite(boxes).all(dim=-1)
    problems = {
        "is not finite": ~finite,
        "has x2 < x1": boxes[..., 2] < boxes[..., 0],
        "has y2 < y1": boxes[..., 3] < boxes[..., 1],
        f"has a label outside [0, {num_classes})": (labels < 0) | (labels >= num_classes),
    }
    for what, bad in problems.items():
        bad = bad & valid
        if bad.any():
            n, j = bad.nonzero()[0].tolist()
            shown = labels[n, j].item() if "label" in what else boxes[n, j].tolist()
            raise ValueError(f"image {n}, box {j} {what}: {shown}")


def box_loss(kind, deltas, anchors, boxes, beta=0.11):
    """Summed box loss of F foreground anchors: deltas, anchors, boxes (F, 4).

    smooth_l1 on the (dx, dy, dw, dh) targets is the paper's (Detectron's beta = 0.11); l1 is
    torchvision v1's and detectron2's; giou compares decoded boxes, as torchvision v2 does.
    """
    if kind == "giou":
        return generalized_box_iou_loss(A.decode(anchors, deltas), boxes, reduction="sum", eps=1e-7)
    targets = A.encode(anchors, boxes)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(deltas, targets, beta=beta, reduction="sum")
    if kind == "l1":
        return F.l1_loss(deltas, targets, reduction="sum")
    raise ValueError(f"box loss must be 'smooth_l1', 'l1' or 'giou', got {kind!r}")


# The CPU optimisation of focal_loss: the same values and gradients (tests/test_loss.py), several times faster
# on a CPU (tools/bench.py's focal loss row, docs/performance.md) and with one saved tensor instead of autograd's
# half dozen: the gradient is computed in closed form in the same sweep as the loss, chunk by cache-sized chunk,
# and the backward pass is one multiplication. It is also finite and accurate where 1 - p_t rounds to 0.


def _focal_chunk(x, t, alpha, gamma, loss, grad):
    """FL of one flat chunk into loss, and its closed-form gradient into grad (if not None).

    Writing z = x for a positive and -x for a negative, p_t = sigmoid(z), log p_t = logsigmoid(z)
    and 1 - p_t = sigmoid(-z): finite for any logit, with no clamping of probabilities.
    dFL/dz = alpha_t (1 - p_t)^gamma (gamma p_t log p_t - (1 - p_t)).
    """
    sign = t * 2 - 1  # +1 positive, -1 negative
    z = x * sign
    q = torch.sigmoid(-z)  # 1 - p_t
    log_pt = F.logsigmoid(z)
    mod = q * q if gamma == 2 else q.pow(gamma)  # (1 - p_t)^gamma, the modulating factor (§3.2)
    if alpha is not None:
        mod.mul_(t * (2 * alpha - 1) + (1 - alpha))  # alpha_t: alpha for positives, 1 - alpha for negatives
    torch.mul(mod, log_pt, out=loss).neg_()
    if grad is not None:
        torch.mul((1 - q).mul_(log_pt).mul_(gamma).sub_(q).mul_(mod), sign, out=grad)


class _SigmoidFocalLoss(torch.autograd.Function):
    """Elementwise FL from logits with its gradient computed in the same sweep, chunk by chunk; the
    backward pass is one multiplication. ignore (..., ) bool, optional: rows of logits with no loss."""

    @staticmethod
    def forward(ctx, logits, targets, alpha, gamma, ignore=None):
        x, t = logits.contiguous().view(-1), targets.contiguous().view(-1)
        loss = torch.empty_like(x)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        chunk = A.elements_per_pass(x.device)  # cache-sized on a CPU: faster than whole tensors
        for s in range(0, x.numel(), chunk):
            _focal_chunk(x[s:s + chunk], t[s:s + chunk], alpha, gamma, loss[s:s + chunk],
                         None if grad is None else grad[s:s + chunk])
        loss = loss.view_as(logits)
        if ignore is not None:
            loss[ignore] = 0.0
        if grad is not None:
            grad = grad.view_as(logits)
            if ignore is not None:
                grad[ignore] = 0.0
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None, None, None


def fused_focal_loss(logits, targets, alpha=0.25, gamma=2.0, ignore=None):
    """focal_loss(..., reduction="none"), fused: elementwise FL of logits (any shape) against 0/1 targets of its
    shape, zero where `ignore` (a bool mask of logits' leading dimensions) is True; finite for any logit."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return _SigmoidFocalLoss.apply(logits, targets.to(logits.dtype), alpha, float(gamma), ignore)


OHEM_BATCH, OHEM_NMS = 128, 0.5  # Table 1d's OHEM rows: 128 examples an image, NMS at 0.5


def ohem_select(hardness, fg, keep, anchors, ratio=3, batch=OHEM_BATCH, nms_thresh=OHEM_NMS):
    """OHEM's examples as Table 1d builds them, per image: every example (anchor outside the ignore band)
    scored by its loss, NMS at nms_thresh over the anchor boxes, then the hardest at most batch/(1+ratio)
    positives and ratio negatives for each of them (at least `ratio` when an image has no positive);
    ratio = inf is Table 1d's "no ratio" row (its best, 32.8 AP): the hardest `batch`, of either kind.
    hardness (N, R), fg and keep (N, R) bool, anchors (R, 4). Returns (N, R) bool."""
    chosen = torch.zeros_like(fg)
    for n in range(len(fg)):
        candidates = keep[n].nonzero().squeeze(1)
        survivors = candidates[nms(anchors[candidates], hardness[n, candidates], nms_thresh)]  # hardest first
        if math.isinf(ratio):
            chosen[n, survivors[:batch]] = True
            continue
        pos = survivors[fg[n, survivors]][: batch // (1 + int(ratio))]
        neg = survivors[~fg[n, survivors]][: min(batch - len(pos), int(ratio * max(1, len(pos))))]
        chosen[n, pos], chosen[n, neg] = True, True
    return chosen


MONITOR = ("pos_logit", "neg_logit", "scored_above_0.05")  # what engine.py logs of the classifier


@torch.no_grad()
def monitor(cls_logits, targets, keep, thresh=0.05):
    """What the classifier does to a batch, to tell a stalled run's cause (collapse to "all background",
    a blow-up): the mean logit of the positive and of the negative (anchor, class) samples outside the
    ignore band (NaN without positives), and the fraction of anchors whose best score exceeds `thresh`
    (what inference keeps, §4). cls_logits, targets (N, R, K), keep (N, R). Returns a (3,) tensor."""
    x = cls_logits.detach().float()
    kept = keep.unsqueeze(-1).float()  # (N, R) -> (N, R, 1)
    n_pos, n_all = (targets * kept).sum(), kept.sum() * x.shape[-1]
    s_pos, s_all = (x * targets * kept).sum(), (x * kept).sum()
    above = (x.amax(-1) > torch.logit(torch.tensor(thresh))).float().mean()  # (N, R, K) -> (N, R)
    return torch.stack([s_pos / n_pos, (s_all - s_pos) / (n_all - n_pos), above])

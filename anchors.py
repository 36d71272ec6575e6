"""Anchors, IoU assignment and box coding for RetinaNet (§4 "Inference and Training", "Anchors").

Nine anchors per location: areas 32^2 ... 512^2 on P3 ... P7, scales {2^0, 2^(1/3), 2^(2/3)} and
aspect ratios {1:2, 1:1, 2:1}. An anchor is foreground when its IoU with a ground-truth box is
>= 0.5, background below 0.4, and ignored in between (§4 "Training").

Shape legend (used in every file): N images, R anchors (all levels), K classes, M ground-truth boxes
per image (padded), A anchors per location (= 9), L pyramid levels.

Anchor order is level, then y, then x, then anchor; within a location the anchors go aspect ratio
first, then scale (torchvision's order, so its trained weights predict for the right anchor).
This is the order in which heads.py flattens its outputs.

fit_anchors, at the end, proposes sizes, scales and ratios for a set of boxes (analyze.py anchors --suggest).
"""
import math

import torch

BACKGROUND = -1  # match() result of an anchor that trains as background; >= 0 is a box index
IGNORE = -2  # match() result of an anchor in the ignore band (no loss)
BBOX_CLAMP = math.log(1000.0 / 16)  # largest dw/dh before exp() (Detectron's bbox_xform_clip)
SIZES = (32, 64, 128, 256, 512)  # anchor size on P3 ... P7 (§4 "Anchors")
STRIDES = (8, 16, 32, 64, 128)  # 2^l for P3 ... P7
SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # §4: three scales per octave
RATIOS = (0.5, 1.0, 2.0)  # §4: aspect ratios (height / width) 1:2, 1:1, 2:1


def elements_per_pass(device):
    """How many elements one vectorised pass of match() or the focal loss should touch: a CPU is ~3-4x
    faster when a pass's temporaries stay in cache; a GPU pays kernel launches for each pass instead."""
    return 1 << 18 if device.type == "cpu" else 1 << 24


def cell_anchors(size, scales=SCALES, ratios=RATIOS, round_=False):
    """The A = len(ratios) * len(scales) anchors of one level, centred on (0, 0), as (A, 4) xyxy.

    ratio = height / width; each anchor keeps the area (size * scale)^2 (§4 "Anchors").
    round_=True reproduces torchvision: integer sizes and corners rounded to whole pixels.
    """
    sizes = torch.tensor([int(size * s) if round_ else size * s for s in scales])  # torchvision: int()
    ratios = torch.tensor(ratios)
    h_ratios = ratios.sqrt()
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # (len(ratios), len(scales)) -> (A,)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return anchors.round() if round_ else anchors


def generate_anchors(image_size, sizes=SIZES, strides=STRIDES, scales=SCALES, ratios=RATIOS,
                     offset=0.0, round_=False, device=None):
    """All anchors of an (H, W) input, level by level: (R, 4) xyxy, R = sum_l H_l * W_l * A.

    Level l has stride 2^l exactly and a ceil(H / 2^l) x ceil(W / 2^l) grid, the size every
    stride-2 convolution (kernel 3, padding 1) in the backbone and FPN produces. Location (y, x) is
    centred at ((x + offset) * s, (y + offset) * s): offset 0.0 is detectron2's and torchvision's.
    """
    height, width = image_size
    out = []
    for size, stride in zip(sizes, strides):
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        xs = (torch.arange(w, dtype=torch.float32, device=device) + offset) * stride
        ys = (torch.arange(h, dtype=torch.float32, device=device) + offset) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H, W, 4) -> (H*W, 1, 4)
        cell = cell_anchors(size, scales, ratios, round_).to(device)  # (A, 4)
        out.append((shifts + cell[None]).reshape(-1, 4))  # (H*W, A, 4) -> (H*W*A, 4)
    return torch.cat(out)


def pad_targets(boxes, labels):
    """Per-image lists of (M_i, 4) boxes and (M_i,) labels -> (N, M, 4), (N, M) and a (N, M) mask.

    Padding lets one tensor op match the whole batch (no Python loop over images). M >= 1, so that
    a batch without any box still indexes like any other.
    """
    N, M = len(boxes), max([1] + [len(b) for b in boxes])
    device = boxes[0].device if N else None
    out_boxes = torch.zeros(N, M, 4, device=device)
    out_labels = torch.full((N, M), -1, dtype=torch.long, device=device)
    valid = torch.zeros(N, M, dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(lab)] = lab
        valid[i, : len(b)] = True
    return out_boxes, out_labels, valid


def pairwise_iou(a, b):
    """IoU of broadcastable (..., 4) xyxy boxes a and b, elementwise: the one formula every IoU here
    uses, in torchvision's order of operations (so the results are bitwise equal to its box_iou)."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = iw.mul_(ih)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter.div_(area_a + area_b - inter)


def box_iou(boxes, anchors):
    """IoU of every box with every anchor: (..., M, 4) x (R, 4) -> (..., M, R)."""
    return pairwise_iou(boxes[..., :, None, :], anchors)


def match(anchors, gt_boxes, gt_valid, fg_iou=0.5, bg_iou=0.4, low_quality=True):
    """Assign every anchor of every image to a ground-truth box, vectorised over the batch.

    anchors (R, 4); gt_boxes (N, M, 4) padded; gt_valid (N, M) bool marks the real boxes.
    Returns (N, R) int64: the index of the assigned box (>= 0), BACKGROUND (-1) or IGNORE (-2).
    """
    (N, M), R = gt_valid.shape, anchors.shape[0]
    matched = torch.full((N, R), BACKGROUND, dtype=torch.long, device=anchors.device)
    if M == 0:
        return matched
    best_iou = torch.empty(N, R, device=anchors.device)
    best_gt = torch.empty(N, R, dtype=torch.long, device=anchors.device)
    per_gt_best = torch.full((N, M), -1.0, device=anchors.device)
    chunk = max(256, elements_per_pass(anchors.device) // (N * M))  # anchors a pass, (N, M, chunk) IoUs
    for s in range(0, R, chunk):
        iou = box_iou(gt_boxes, anchors[s:s + chunk])  # (N, M, chunk)
        iou.masked_fill_(~gt_valid[..., None], -1.0)  # padding never wins
        torch.max(iou, dim=1, out=(best_iou[:, s:s + chunk], best_gt[:, s:s + chunk]))  # best box of each anchor
        per_gt_best = torch.maximum(per_gt_best, iou.amax(dim=2))  # best anchor IoU of each box
    matched = torch.where(best_iou >= fg_iou, best_gt, matched)  # §4: IoU >= 0.5 is foreground
    matched = torch.where((best_iou >= bg_iou) & (best_iou < fg_iou), IGNORE, matched)  # [0.4, 0.5) ignored
    if low_quality:
        # Each box also claims the anchors it overlaps most (ties included), as detectron2 and
        # torchvision do, so no box is left without a positive. A box whose best IoU is 0 claims
        # nothing (torchvision would hand it every anchor that overlaps nothing). Only anchors whose
        # own best IoU reaches some box's best can be claimed: the IoUs of those few are recomputed.
        lowest = per_gt_best.masked_fill(~gt_valid | (per_gt_best <= 0), 2.0).amin(dim=1, keepdim=True)  # (N, 1)
        n_idx, r_idx = (best_iou >= lowest).nonzero(as_tuple=True)
        iou = pairwise_iou(gt_boxes[n_idx], anchors[r_idx, None])  # (candidates, M)
        claimed = ((iou == per_gt_best[n_idx]) & (per_gt_best[n_idx] > 0) & gt_valid[n_idx]).any(dim=1)
        matched[n_idx[claimed], r_idx[claimed]] = best_gt[n_idx[claimed], r_idx[claimed]]
    return matched


def encode(anchors, boxes, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets (dx, dy, dw, dh) that move each anchor onto its box: (..., 4) -> (..., 4)."""
    wx, wy, ww, wh = weights
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    bx, by = boxes[..., 0] + 0.5 * bw, boxes[..., 1] + 0.5 * bh
    return torch.stack(
        [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=-1
    )


def decode(anchors, deltas, weights=(1.0, 1.0, 1.0, 1.0), clamp=BBOX_CLAMP):
    """Inverse of encode: apply (dx, dy, dw, dh) to anchors, giving xyxy boxes: (..., 4) -> (..., 4)."""
    wx, wy, ww, wh = weights
    anchors = anchors.to(deltas.dtype)
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clamp)  # keep exp() finite for wild predictions
    dh = (deltas[..., 3] / wh).clamp(max=clamp)
    cx, cy = dx * aw + ax, dy * ah + ay
    half_w, half_h = 0.5 * torch.exp(dw) * aw, 0.5 * torch.exp(dh) * ah
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


# Choosing anchors for your own boxes (not in the paper, whose anchors are fixed for COCO): a search over the
# coverage of the boxes by the anchors, as Zlocha et al.'s anchor optimisation for RetinaNet (MICCAI 2019), here
# with each box against the nearest anchor centre of every level, so that the stride counts as in training.

def nearest_anchor_iou(boxes, anchor_wh, anchor_strides):
    """(M, A') IoU of each box (M, 4) xyxy with each anchor shape (A', 2) placed at the anchor centre of its
    level (stride (A',)) nearest to the box's centre (centres at multiples of the stride, generate_anchors'): the
    best centre of that level, as the overlap falls with the distance along x and y apart. A box at the right or
    bottom edge may get a centre past the grid's last; analyze.py reports training's own match beside it."""
    c, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]  # (M, 2)
    d = c[:, None] - torch.round(c[:, None] / anchor_strides[None, :, None]) * anchor_strides[None, :, None]
    lo = torch.max(-wh[:, None] / 2, d - anchor_wh[None] / 2)  # (M, A', 2): the overlap, box-centred
    hi = torch.min(wh[:, None] / 2, d + anchor_wh[None] / 2)
    inter = (hi - lo).clamp(min=0).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchor_wh.prod(-1)[None] - inter)


def anchor_shapes(sizes, scales, ratios, strides=STRIDES):
    """The widths and heights (L*A, 2) of every level's cell anchors (cell_anchors, unrounded), and their strides."""
    shapes = [c[:, 2:] - c[:, :2] for c in (cell_anchors(s, scales, ratios) for s in sizes)]
    return torch.cat(shapes).double(), torch.tensor(strides, dtype=torch.float64).repeat_interleave(shapes[0].shape[0])


def fit_anchors(boxes, sizes=SIZES, scales=SCALES, ratios=RATIOS, strides=STRIDES, iou=0.5, rounds=3):
    """Anchor sizes, scales and ratios for boxes (M, 4) xyxy at the training scale: as many of each as given,
    the sizes an octave apart as the levels are, each value searched in turn on a grid (the P3 size in whole
    pixels from a quarter to twice the given, 1/6 octave apart; scales 2^-1/2 ... 2^3/2 in 1/12 octaves; ratios
    1/16 ... 16 in 1/4 octaves) for the most boxes whose best anchor (nearest_anchor_iou) reaches `iou`, the mean
    best IoU breaking ties. Returns (sizes, scales, ratios), each a tuple, and the coverage before and after."""
    boxes = boxes.double()

    def coverage(p):
        return nearest_anchor_iou(boxes, *anchor_shapes(*p, strides)).max(1).values

    def score(p):  # boxes covered first, then the mean best IoU: a tie-break that never trades a box away
        best = coverage(p)
        return int((best >= iou).sum()), best.mean().item()

    p = (tuple(sizes), tuple(scales), tuple(ratios))
    best = score(p)
    grid = {0: sorted({max(2, round(sizes[0] * 2 ** (k / 6))) for k in range(-12, 7)}),
            1: [round(2 ** (k / 12), 4) for k in range(-6, 19)], 2: [round(2 ** (k / 4), 4) for k in range(-16, 17)]}
    for _ in range(rounds):
        moved = False
        for k, i in [(0, 0)] + [(1, j) for j in range(len(scales))] + [(2, j) for j in range(len(ratios))]:
            for value in grid[k]:
                q = list(p)
                q[k] = (tuple(value * 2 ** level for level in range(len(sizes))) if k == 0 else
                        tuple(sorted(p[k][:i] + (value,) + p[k][i + 1:])))
                if (s := score(q)) > best:
                    p, best, moved = tuple(q), s, True
        if not moved:
            break
    before, after = ((coverage(x) >= iou).double().mean().item() for x in ((tuple(sizes), scales, ratios), p))
    return p, before, after

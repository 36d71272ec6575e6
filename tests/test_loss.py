"""loss.py: focal loss (plain and fused) against torchvision and Eq. 5 in float64, the fused form against the plain
one; the training loss against torchvision's."""
import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops import sigmoid_focal_loss

import anchors as A
import model as M
import weights as W
from loss import LossConfig, focal_loss, fused_focal_loss, retinanet_loss


def eq5_float64(logits, targets, alpha, gamma):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), written as in the paper (§3.2, Eq. 5)."""
    p = torch.sigmoid(logits.double())
    t = targets.double()
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


def sample(n=4000, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) * scale, (torch.rand(n, 8, generator=g) < 0.2).float()


def fused(logits, targets, alpha=0.25, gamma=2.0, reduction="sum"):
    """fused_focal_loss with focal_loss's reductions."""
    loss = fused_focal_loss(logits, targets, alpha, gamma)
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("fn", [focal_loss, fused], ids=["plain", "fused"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_loss_equals_torchvision_value_and_gradient(fn, gamma, reduction):
    logits, targets = sample()
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = fn(x1, targets, 0.25, gamma, reduction)
    tv = sigmoid_focal_loss(x2, targets, 0.25, gamma, reduction)
    torch.testing.assert_close(ours, tv, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    tv.sum().backward()
    assert fn is focal_loss or torch.isfinite(x1.grad).all()
    # autograd of the plain form (torchvision's and our focal_loss) gives NaN for gamma < 1 where 1 - p_t rounds
    # to 0 (d/dq q^0.5 = inf); the fused form's closed-form gradient is finite
    finite = torch.isfinite(x2.grad)
    assert torch.equal(finite, torch.isfinite(x1.grad)) or fn is fused
    torch.testing.assert_close(x1.grad[finite], x2.grad[finite], rtol=1e-4, atol=1e-7)


def eq5_decimal(x, t, alpha, gamma):
    """Eq. 5 for one logit in 50-digit arithmetic, where float64 rounds p to exactly 0 or 1."""
    x = Decimal(x)
    p = 1 / (1 + (-x).exp())
    p_t = p if t else 1 - p
    alpha_t = Decimal(1) if alpha is None else Decimal(alpha) if t else 1 - Decimal(alpha)
    return -alpha_t * (1 - p_t) ** Decimal(gamma) * p_t.ln()


@pytest.mark.parametrize("fn", [focal_loss, fused], ids=["plain", "fused"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.0), (None, 0.0), (None, 1.0), (0.5, 0.5), (0.25, 1.0),
                                         (0.25, 5.0)])  # the last two: Table 1b's (e1) and (e5) rows
def test_focal_loss_equals_eq5_in_float64(fn, alpha, gamma):
    logits, targets = sample(scale=5.0)
    logits = logits.clamp(-15, 15)  # float64 holds 1 - p to 1e-9 relative here
    if fn is focal_loss:  # float32 holds 1 - p to 1e-4 relative up to |x| = 7 (1 - sigmoid(7) = 9e-4)
        logits = logits.clamp(-7, 7)
    x = logits.clone().requires_grad_()
    ours = fn(x, targets, alpha, gamma, reduction="none")
    ours.sum().backward()
    x64 = logits.double().requires_grad_()
    ref = eq5_float64(x64, targets, alpha, gamma)
    ref.sum().backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 0.5)])
def test_fused_focal_loss_is_finite_and_exact_for_logits_of_50(alpha, gamma):
    getcontext().prec = 50
    cases = [(50.0, 1), (50.0, 0), (-50.0, 1), (-50.0, 0), (30.0, 0), (-100.0, 1)]
    x = torch.tensor([c[0] for c in cases], requires_grad=True)
    ours = fused_focal_loss(x, torch.tensor([float(c[1]) for c in cases]), alpha, gamma)
    ours.sum().backward()
    h = Decimal("1e-20")
    for i, (xi, ti) in enumerate(cases):
        value = eq5_decimal(xi, ti, alpha, gamma)
        up, down = eq5_decimal(Decimal(xi) + h, ti, alpha, gamma), eq5_decimal(Decimal(xi) - h, ti, alpha, gamma)
        slope = (up - down) / (2 * h)  # central difference
        assert math.isclose(ours[i].item(), float(value), rel_tol=1e-5, abs_tol=1e-30), (xi, ti)
        assert math.isclose(x.grad[i].item(), float(slope), rel_tol=1e-4, abs_tol=1e-30), (xi, ti)


@pytest.mark.parametrize("fn", [focal_loss, fused], ids=["plain", "fused"])
def test_gamma_zero_is_alpha_balanced_ce_and_alpha_none_is_ce(fn):
    logits, targets = sample()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    torch.testing.assert_close(fn(logits, targets, 0.25, 0.0, "none"), alpha_t * bce)  # Eq. 3
    torch.testing.assert_close(fn(logits, targets, None, 0.0, "none"), bce)  # Eq. 1


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 0.5), (0.25, 5.0)])
def test_fused_focal_loss_equals_the_plain_one_in_value_and_gradient(alpha, gamma):
    """The CPU optimisation against Eq. 5 as written, on logits where the plain form's float32 is accurate,
    and with an ignore mask: those rows carry no loss and no gradient."""
    logits, targets = sample(n=3000, scale=3.0)
    ignore = torch.rand(3000, generator=torch.Generator().manual_seed(1)) < 0.1  # (3000,) rows of (3000, 8)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = fused_focal_loss(x1, targets, alpha, gamma, ignore=ignore)
    plain = focal_loss(x2, targets, alpha, gamma, reduction="none") * ~ignore[:, None]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    (fast * targets.add(1)).sum().backward()  # a weighted sum: each element's gradient is checked
    (plain * targets.add(1)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert (x1.grad[ignore] == 0).all() and (x1.grad[~ignore].abs() > 1e-3).float().mean() > 0.5


@pytest.mark.parametrize("fn", [focal_loss, fused_focal_loss], ids=["plain", "fused"])
def test_focal_loss_rejects_bad_arguments(fn):
    logits, targets = sample(10)
    with pytest.raises(ValueError, match="gamma"):
        fn(logits, targets, gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, targets, reduction="max")


def torchvision_pair(version, box_loss=None):
    """torchvision's RetinaNet (batch norm on running statistics) and ours with the same weights."""
    torch.manual_seed(version)
    fn = retinanet_resnet50_fpn if version == 1 else retinanet_resnet50_fpn_v2
    tv = fn(weights=None, weights_backbone=None, min_size=256, max_size=384)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0 if version == 1 else m.eps  # torchvision's v1 COCO weights run with eps 0
    if box_loss:
        tv.head.regression_head._loss_type = box_loss
    ours = W.from_torchvision(tv.state_dict(), version=version)
    ours.cfg.min_size, ours.cfg.max_size = 256, 384
    return tv, ours


def torchvision_losses(tv, image, target):
    tv.train()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # use the running statistics, as our frozen batch norm does
    return tv([image], [target])


def our_losses(ours, image, target, **kw):
    batch, _ = M.preprocess([image], ours.cfg)  # 256 x 384 stays as it is: no resize, no padding
    cls_logits, box_deltas = ours(batch)
    anchors, _ = M.make_anchors(ours.cfg, batch.shape[-2:])
    return retinanet_loss(cls_logits, box_deltas, anchors, [target["boxes"]], [target["labels"]], **kw)


TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 120.0, 200.0], [200.0, 50.0, 260.0, 90.0], [30.0, 30.0, 50.0, 60.0]]),
     "labels": torch.tensor([3, 17, 90])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # pure background
]


@pytest.mark.parametrize("version,kind,kw", [
    (1, None, {"cfg": LossConfig(box_loss="l1")}),
    (2, None, {"cfg": LossConfig(box_loss="giou")}),
    (1, "smooth_l1", {"cfg": LossConfig(box_loss="smooth_l1", smooth_l1_beta=1.0)}),  # torchvision's has beta 1
])
def test_retinanet_loss_equals_torchvision_for_one_image(version, kind, kw):
    tv, ours = torchvision_pair(version, kind)
    image = torch.rand(3, 256, 384, generator=torch.Generator().manual_seed(0))
    for target in TARGETS:
        with torch.no_grad():
            expected = torchvision_losses(tv, image, target)
            got = our_losses(ours, image, target, **kw)
        torch.testing.assert_close(got["cls"], expected["classification"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["box"], expected["bbox_regression"], rtol=1e-4, atol=1e-6)


def random_batch(seed=0, N=2, R_side=256, K=5):
    g = torch.Generator().manual_seed(seed)
    anchors = A.generate_anchors((R_side, R_side))
    R = anchors.shape[0]
    boxes = [torch.tensor([[10.0, 10.0, 90.0, 120.0], [150.0, 40.0, 250.0, 100.0]]), torch.zeros(0, 4)][:N]
    labels = [torch.tensor([1, 4]), torch.zeros(0, dtype=torch.long)][:N]
    return torch.randn(N, R, K, generator=g), torch.randn(N, R, 4, generator=g) * 0.1, anchors, boxes, labels


def test_batch_loss_is_sums_over_images_divided_by_all_foreground_anchors():
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    batch = retinanet_loss(cls_logits, deltas, anchors, boxes, labels)
    num_fg = [(A.match(anchors, b[None], torch.ones(1, len(b), dtype=torch.bool)) >= 0).sum().item() for b in boxes]
    singles = [retinanet_loss(cls_logits[i:i + 1], deltas[i:i + 1], anchors, boxes[i:i + 1], labels[i:i + 1])
               for i in range(2)]
    for key in ("cls", "box"):
        summed = sum(s[key] * max(1, n) for s, n in zip(singles, num_fg))
        torch.testing.assert_close(batch[key], summed / sum(num_fg))


def test_ignored_anchors_carry_no_loss_and_background_image_only_background_loss():
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    matched = A.match(anchors, *A.pad_targets(boxes, labels)[::2])
    ignored = matched == A.IGNORE
    assert ignored.any()
    changed = cls_logits.clone()
    changed[ignored] = 100.0
    torch.testing.assert_close(retinanet_loss(changed, deltas, anchors, boxes, labels)["cls"],
                               retinanet_loss(cls_logits, deltas, anchors, boxes, labels)["cls"])
    empty = retinanet_loss(cls_logits[1:], deltas[1:], anchors, boxes[1:], labels[1:])
    torch.testing.assert_close(empty["cls"], focal_loss(cls_logits[1], torch.zeros_like(cls_logits[1])), rtol=1e-5,
                               atol=1e-6)
    assert empty["box"].item() == 0.0


def test_reduce_num_fg_sets_the_normaliser():
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    plain = retinanet_loss(cls_logits, deltas, anchors, boxes, labels)
    halved = retinanet_loss(cls_logits, deltas, anchors, boxes, labels, reduce_num_fg=lambda n: n * 2)
    torch.testing.assert_close(halved["cls"] * 2, plain["cls"])


def test_fused_focal_loss_is_the_same_in_cpu_and_gpu_sized_passes(monkeypatch):
    logits, targets = sample(n=1 << 16)  # (65536, 8): 2 cache-sized passes, 1 GPU-sized one
    results = []
    for elements in (1 << 18, 1 << 24):
        monkeypatch.setattr(A, "elements_per_pass", lambda device, e=elements: e)
        x = logits.clone().requires_grad_()
        fused_focal_loss(x, targets).sum().backward()
        results.append((fused_focal_loss(x.detach(), targets), x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_give_the_float32_losses_and_half_gradients(dtype):
    """Under AMP the heads hand the loss 16-bit tensors (train.py --amp); both losses must be the float32
    losses of the same values, and the gradients reach the heads in their own dtype."""
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    cls_half, deltas_half = cls_logits.to(dtype).requires_grad_(), deltas.to(dtype).requires_grad_()
    half = retinanet_loss(cls_half, deltas_half, anchors, boxes, labels)
    cls_full, deltas_full = cls_half.detach().float().requires_grad_(), deltas_half.detach().float().requires_grad_()
    full = retinanet_loss(cls_full, deltas_full, anchors, boxes, labels)
    for key in ("cls", "box"):
        assert half[key].dtype == torch.float32
        torch.testing.assert_close(half[key], full[key], rtol=1e-6, atol=0)
    (half["cls"] + half["box"]).backward()
    (full["cls"] + full["box"]).backward()
    for got, expected in ((cls_half.grad, cls_full.grad), (deltas_half.grad, deltas_full.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected.to(dtype))  # the float32 gradient, rounded once


@pytest.mark.parametrize("box,label,message", [
    ([50.0, 10.0, 40.0, 30.0], 1, "image 1, box 0 has x2 < x1"),
    ([10.0, 30.0, 40.0, 20.0], 1, "image 1, box 0 has y2 < y1"),
    ([float("nan"), 10.0, 40.0, 30.0], 1, "image 1, box 0 is not finite"),
    ([10.0, 10.0, 40.0, 30.0], 5, r"image 1, box 0 has a label outside \[0, 5\)"),
    ([10.0, 10.0, 40.0, 30.0], -1, r"label outside"),
])
def test_bad_targets_raise_value_error_saying_where(box, label, message):
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    boxes[1], labels[1] = torch.tensor([box]), torch.tensor([label])
    with pytest.raises(ValueError, match=message):
        retinanet_loss(cls_logits, deltas, anchors, boxes, labels)

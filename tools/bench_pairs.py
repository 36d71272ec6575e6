"""The two sides of each row of tools/bench.py: torchvision's RetinaNet and ours with the same weights, and
for each measurement a pair of callables (torchvision's, ours) with the check that their results agree.

Nothing here times anything; bench.py races the pairs.
"""
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import ResNet
from torchvision.ops import FrozenBatchNorm2d, box_iou, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import anchors as A
import backbone as B
import data as D
import model as M
import train
import weights as W
from evaluate import evaluate
from loss import LossConfig, fused_focal_loss, retinanet_loss


def make_pair(size, device, seed=0):
    """torchvision's retinanet_resnet50_fpn as one fine-tunes it, ours with its weights, and the loss
    torchvision's computes as a LossConfig (its L1 box loss): (tv, ours, loss_cfg)."""
    torch.manual_seed(seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80, min_size=size[0],
                                max_size=size[1], detections_per_img=100)
    body = tv.backbone.body
    for name, bn in list(body.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):  # frozen BN with eps 0, as torchvision's COCO weights run
            frozen = FrozenBatchNorm2d(bn.num_features, eps=0.0)
            frozen.load_state_dict(bn.state_dict(), strict=False)
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, frozen)
    for m in (body.conv1, body.layer1):  # trainable_backbone_layers=3, torchvision's default
        m.requires_grad_(False)
    nn.init.constant_(tv.head.classification_head.cls_logits.bias, -2.5)  # scores > 0.05: real postprocessing
    ours = W.from_torchvision(tv.state_dict(), version=1)
    ours.cfg.min_size, ours.cfg.max_size = size
    cfg = ours.cfg

    tv.anchor_generator.forward = _exact_anchors(cfg)  # the same anchors for both, so detections can be compared
    return tv.to(device), ours.to(device), W.torchvision_loss(1)


def make_quickstart_pair(device, num_classes=4, seed=0):
    """The quick start's detector (train.QUICKSTART: ResNet-10 with trainable BN, 64-channel FPN, GroupNorm
    heads, anchors 16-256, 160 px) built from torchvision's parts, and ours with its weights, in training mode,
    and the loss both compute: (tv, ours, loss_cfg)."""
    q = train.QUICKSTART
    torch.manual_seed(seed)
    block, layers = B.ARCHS[q["arch"]][:2]
    body = ResNet(block, layers)  # torchvision's ResNet, trainable BatchNorm2d: the quick start trains from scratch
    c = q["channels"]
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], c,
                               extra_blocks=LastLevelP6P7(512, c))  # 512 != 64 in channels: P6 from C5 (paper)
    head = RetinaNetHead(c, 9, num_classes, norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "smooth_l1"  # the paper's box loss; torchvision's beta is 1
    tv = RetinaNet(backbone, num_classes, min_size=q["min_size"], max_size=q["max_size"], head=head)
    cfg = M.ModelConfig(num_classes=num_classes, arch=q["arch"], norm=q["norm"], freeze_at=q["freeze_at"],
                        channels=c, head_norm=q["head_norm"], anchor_sizes=tuple(q["anchor_sizes"]),
                        min_size=q["min_size"], max_size=q["max_size"], size_divisible=q["size_divisible"])
    ours = M.RetinaNet(cfg)
    ours.load_state_dict({W.torchvision_key(k): v for k, v in tv.state_dict().items()}, strict=True)
    tv.anchor_generator.forward = _exact_anchors(cfg)
    loss_cfg = LossConfig(smooth_l1_beta=1.0)  # torchvision's smooth L1 has beta 1, ours 0.11 (Detectron)
    return tv.to(device).train(), ours.to(device).train(), loss_cfg


def _exact_anchors(cfg):
    """torchvision takes the P6/P7 strides as image // grid (61 px, not 64, at 800 px): give it ours."""
    def forward(image_list, features):
        anchors = M.make_anchors(cfg, image_list.tensors.shape[-2:], features[0].device)[0]
        return [anchors] * len(image_list.image_sizes)

    return forward


def random_targets(n, size, g, num_classes=80, low=2, high=8):
    out = []
    for _ in range(n):
        m = int(torch.randint(low, high + 1, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * torch.tensor([size[1], size[0]]) * 0.7
        wh = (torch.rand(m, 2, generator=g) * 0.25 + 0.05) * torch.tensor([size[1], size[0]])
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(num_classes, (m,), generator=g)})
    return out


def train_steps(tv, ours, loss_cfg, images, targets, amp=False):
    """One SGD step of each: forward, loss, backward, step (the same preprocessing as torchvision's). Each steps
    on its own loss, normalised its own way, so after one step their weights part: check before racing."""
    dev = images[0].device
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            for m in (tv, ours)]
    tv.train()
    ours.train()

    def tv_step():
        with torch.autocast(dev.type, enabled=amp):
            losses = tv(images, targets)
        opts[0].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opts[0].step()
        return losses

    def our_step():
        batch, _ = M.preprocess(images, ours.cfg)
        with torch.autocast(dev.type, enabled=amp):
            cls_logits, box_deltas = ours(batch)
        anchors, _ = M.make_anchors(ours.cfg, batch.shape[-2:], dev)
        losses = retinanet_loss(cls_logits, box_deltas, anchors, [t["boxes"] for t in targets],
                                [t["labels"] for t in targets], loss_cfg)
        opts[1].zero_grad(set_to_none=True)
        (losses["cls"] + losses["box"]).backward()
        opts[1].step()
        return losses

    return tv_step, our_step


def check_train_losses(tv, ours, loss_cfg, images, targets, amp=False):
    """torchvision divides each image's loss by its own foreground count and averages the images; ours
    divides the batch by all of them (Detectron). Fed one image at a time, the two must agree: within
    1e-4 relative in float32, within 1e-2 under autocast (each model rounds its own way to 16 bits)."""
    worst, tol, dev = 0.0, 1e-2 if amp else 1e-4, images[0].device.type
    for img, tgt in zip(images, targets):
        with torch.no_grad(), torch.autocast(dev, enabled=amp):
            tv.train()
            expected = tv([img], [tgt])
            batch, _ = M.preprocess([img], ours.cfg)
            cls_logits, box_deltas = ours(batch)
            anchors, _ = M.make_anchors(ours.cfg, batch.shape[-2:], img.device)
            got = retinanet_loss(cls_logits, box_deltas, anchors, [tgt["boxes"]], [tgt["labels"]], loss_cfg)
        for a, b in ((got["cls"], expected["classification"]), (got["box"], expected["bbox_regression"])):
            worst = max(worst, abs(a.item() - b.item()) / abs(b.item()))
    return worst < tol, f"max relative loss difference {worst:.1e}" + (" (mixed precision)" if amp else "")


def inference_pair(tv, ours, images, amp=False):
    """torchvision's inference and ours (model.detect; amp: under autocast, bfloat16 on a CPU)."""
    tv.eval()

    def tv_run():
        with torch.inference_mode():
            return tv(images)

    return tv_run, lambda: M.detect(ours, images, amp=amp)


def bfloat16_coco_ap(coco_root):
    """The check the bfloat16 inference row needs: bfloat16 detections are not float32's to a tolerance (scores
    move by ~1e-3, near-ties swap in top-k), so their COCO AP is compared, with torchvision's COCO weights (ours
    in float32 gives torchvision's detections: the float32 row) on the genuine val2017 photos under coco_root.
    |AP difference| <= 0.005 passes. Returns (passed, message); without the weights (offline): (None, why)."""
    try:
        model = W.load_torchvision(1)
    except RuntimeError:  # offline
        return None, "AP not checked: torchvision's COCO weights could not be downloaded"
    ds = D.CocoDetection(*D.coco_paths(coco_root, "val2017"))
    fp32, bf16 = (evaluate(model, ds, amp=amp)["AP"] for amp in (False, True))
    return abs(bf16 - fp32) <= 0.005, f"COCO AP on {len(ds)} val2017 photos {bf16:.4f} (bfloat16), {fp32:.4f} (float32)"


def same_detections(expected, got, score_atol=1e-5, box_atol=1e-3, box_rtol=1e-6):
    """The same detections: as many, each with a partner of the same label, score within score_atol (ONNX
    Runtime's own kernels and fusions: 1e-4, as the export's tests) and box within box_atol px plus box_rtol
    of the coordinate (float32 rounding through ResNet-50 and exp(dw): 1.1e-3 px seen at 1,216 px). Partners,
    not positions: detections whose scores tie within rounding come out of top-k and NMS in either order.
    Says how close they came, or where they part."""
    if len(expected) != len(got):
        return False, f"detections differ ({len(expected)} vs {len(got)} images)"
    box, excess, score = 0.0, 0.0, 0.0
    for i, (e, o) in enumerate(zip(expected, got)):
        if len(e["boxes"]) != len(o["boxes"]):
            return False, f"detections differ (image {i}: {len(e['boxes'])} vs {len(o['boxes'])})"
        if not len(e["boxes"]):
            continue
        apart = torch.cdist(e["boxes"], o["boxes"], p=float("inf"))  # (D, D) largest coordinate difference
        apart[(e["labels"][:, None] != o["labels"][None]) |
              ((e["scores"][:, None] - o["scores"][None]).abs() > score_atol)] = float("inf")
        nearest, partner = apart.min(1)
        if len(set(partner.tolist())) != len(partner) or not nearest.isfinite().all():
            return False, f"detections differ (image {i}: a label or score without a partner)"
        diff = (e["boxes"] - o["boxes"][partner]).abs()
        box, excess = max(box, diff.max().item()), max(excess, (diff - box_rtol * e["boxes"].abs()).max().item())
        score = max(score, (e["scores"] - o["scores"][partner]).abs().max().item())
    n = sum(len(d["boxes"]) for d in got)
    if excess > box_atol:  # scores are within score_atol: a partner has to be
        return False, f"detections differ: boxes up to {box:.1e} px apart"
    return True, f"the same {n} detections (boxes within {box:.0e} px, scores within {score:.0e})"


def focal_pair(shape, device, g):
    """torchvision's sigmoid_focal_loss and ours as training runs it (fused_focal_loss), summed, forward and
    backward: each returns (loss, gradient)."""
    logits = (torch.randn(shape, generator=g) * 2 - 3).to(device)
    targets = (torch.rand(shape, generator=g) < 2e-4).float().to(device)

    def run(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets)
        loss.backward()
        return loss.detach(), x.grad

    return (lambda: run(lambda x, t: sigmoid_focal_loss(x, t, reduction="sum")),
            lambda: run(lambda x, t: fused_focal_loss(x, t).sum()))


def match_pair(cfg, size, n, device, g):
    anchors = M.make_anchors(cfg, size, device)[0]
    boxes = [t["boxes"].to(device) for t in random_targets(n, size, g, low=50, high=50)]
    matcher = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def ours():
        padded, _, valid = A.pad_targets(boxes, [torch.zeros(len(b), dtype=torch.long) for b in boxes])
        return A.match(anchors, padded, valid)

    return lambda: torch.stack([matcher(box_iou(b, anchors)) for b in boxes]), ours

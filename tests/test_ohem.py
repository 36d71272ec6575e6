"""OHEM (Table 1d) against hand cases and torchvision's NMS and matcher; the classifier's monitor (loss.monitor)
by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from test_loss import random_batch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import box_iou, nms

import loss as L
from loss import LossConfig, retinanet_loss

ANCHORS = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10],  # IoU 0.82
                        [50, 50, 60, 60], [100, 100, 110, 110], [200, 200, 210, 210], [300, 0, 310, 10],
                        [0, 300, 10, 310],
                        [400, 400, 410, 410], [402.5, 400, 412.5, 410]], dtype=torch.float32)  # IoU 0.6


def test_ohem_takes_the_hardest_examples_of_each_image_after_nms_one_to_three():
    assert box_iou(ANCHORS[:2], ANCHORS[:2])[0, 1] == pytest.approx(0.818, abs=1e-3)
    assert box_iou(ANCHORS[7:], ANCHORS[7:])[0, 1] == pytest.approx(0.6)
    hardness = torch.tensor([[5.0, 9.0, 1.0, 4.0, 3.0, 2.0, 0.5, 0.1, 0.2],  # anchor 1 overlaps 0 (IoU .82): NMS
                             [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # drops 0, and 8 (IoU .6) drops 7
    fg = torch.tensor([[False, False, True, False, False, False, False, False, False], [False] * 9])
    keep = torch.tensor([[True] * 6 + [False, True, True], [True] * 9])
    chosen = L.ohem_select(hardness, fg, keep, ANCHORS, ratio=3, batch=128)
    # image 0: its positive and the three hardest negatives that survive NMS (1, 3, 4), never the ignored 6
    assert chosen[0].nonzero().squeeze(1).tolist() == [1, 2, 3, 4]
    assert chosen[1].sum() == 3  # no positive: still `ratio` negatives
    small = L.ohem_select(hardness, fg, keep, ANCHORS, ratio=3, batch=3)  # room for 3 // (1 + 3) = 0 positives
    assert small[0].nonzero().squeeze(1).tolist() == [1, 3, 4]
    wide = L.ohem_select(hardness, fg, keep, ANCHORS, ratio=math.inf, batch=128)
    assert wide[0].nonzero().squeeze(1).tolist() == [1, 2, 3, 4, 5, 8]  # NMS at .5 takes 7 out (at .7 it would stay)


def test_ohem_without_a_ratio_takes_the_hardest_of_either_kind():
    anchors = ANCHORS[:5]
    hardness = torch.tensor([[5.0, 9.0, 1.0, 4.0, 3.0]])  # NMS drops 0 (under 1); then 1, 3, 4, 2 by loss
    fg = torch.tensor([[False, False, True, True, False]])
    keep = torch.ones(1, 5, dtype=torch.bool)
    chosen = L.ohem_select(hardness, fg, keep, anchors, ratio=math.inf, batch=3)
    assert chosen[0].nonzero().squeeze(1).tolist() == [1, 3, 4]  # positive 2 is the easiest: left out


def test_monitor_is_the_mean_logits_of_positives_and_negatives_and_the_share_scored_above_thresh():
    cls_logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5], [-5.0, -6.0], [9.0, 9.0]]])  # (1, R=4, K=2)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    keep = torch.tensor([[True, True, True, False]])  # anchor 3 ignored: not in the means
    pos, neg, above = L.monitor(cls_logits, targets, keep).tolist()
    assert pos == pytest.approx((2.0 + 0.5) / 2) and neg == pytest.approx((-1.0 - 3.0 - 5.0 - 6.0) / 4)
    assert above == pytest.approx(3 / 4)  # sigmoid > .05: anchors 0, 1 and 3 (logit(.05) = -2.94)
    assert math.isnan(L.monitor(cls_logits, torch.zeros_like(targets), keep)[0])  # no positive


def test_ohem_loss_without_a_ratio_is_ce_over_the_hardest_128_of_each_image_over_the_foreground_count():
    """The expected loss from torchvision's parts: its Matcher assigns the anchors (0.5 / 0.4, low-quality
    matches; tests/test_anchors.py holds anchors.match equal to it), CE (Eq. 1) scores every example outside
    the ignore band, torchvision.ops.nms at 0.5 over the anchor boxes orders them, the first 128 an image count."""
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    got = retinanet_loss(cls_logits, deltas, anchors, boxes, labels, LossConfig(gamma=0.0, alpha=None,
                                                                                 ohem_ratio=math.inf))
    matcher, expected, num_fg = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True), 0.0, 0
    for logits, b, lab in zip(cls_logits, boxes, labels):  # (R, K), (M, 4), (M,)
        matched = matcher(box_iou(b, anchors)) if len(b) else torch.full((len(anchors),), -1)  # (R,) -1 bg, -2 ign.
        targets = torch.zeros_like(logits)
        fg = (matched >= 0).nonzero().squeeze(1)
        targets[fg, lab[matched[fg]]] = 1.0
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)  # (R,) an anchor's CE
        kept = (matched != -2).nonzero().squeeze(1)
        hardest = kept[nms(anchors[kept], ce[kept], 0.5)][:128]
        assert len(hardest) == 128
        expected, num_fg = expected + ce[hardest].sum(), num_fg + len(fg)
    torch.testing.assert_close(got["cls"], expected / num_fg)

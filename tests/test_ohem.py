"""OHEM (Table 1d) and the classifier's diagnostics (loss.monitor, loss.pull_at_prior) against hand cases
and the paper's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F
from test_loss import random_batch

import loss as L
from loss import retinanet_loss


def test_ohem_takes_the_hardest_examples_of_each_image_after_nms_one_to_three():
    anchors = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [100, 100, 110, 110],
                            [200, 200, 210, 210], [300, 0, 310, 10], [0, 300, 10, 310]], dtype=torch.float32)
    hardness = torch.tensor([[5.0, 9.0, 1.0, 4.0, 3.0, 2.0, 0.5],  # anchor 1 overlaps 0 (IoU .82): NMS drops 0
                             [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    fg = torch.tensor([[False, False, True, False, False, False, False], [False] * 7])
    keep = torch.tensor([[True] * 6 + [False], [True] * 7])
    chosen = L.ohem_select(hardness, fg, keep, anchors, ratio=3, batch=128)
    # image 0: its positive and the three hardest negatives that survive NMS (1, 3, 4), never the ignored 6
    assert chosen[0].nonzero().squeeze(1).tolist() == [1, 2, 3, 4]
    assert chosen[1].sum() == 3  # no positive: still `ratio` negatives
    small = L.ohem_select(hardness, fg, keep, anchors, ratio=3, batch=3)  # room for 3 // (1 + 3) = 0 positives
    assert small[0].nonzero().squeeze(1).tolist() == [1, 3, 4]


def test_ohem_without_a_ratio_takes_the_hardest_of_either_kind():
    anchors = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [100, 100, 110, 110],
                            [200, 200, 210, 210]], dtype=torch.float32)
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
    cls_logits, deltas, anchors, boxes, labels = random_batch()
    got = retinanet_loss(cls_logits, deltas, anchors, boxes, labels, gamma=0.0, alpha=None, ohem_ratio=math.inf)
    matched, _, targets, keep = L.assign_targets(anchors, boxes, labels, cls_logits.shape[-1])
    ce = F.binary_cross_entropy_with_logits(cls_logits, targets, reduction="none") * keep.unsqueeze(-1)  # Eq. 1
    chosen = L.ohem_select(ce.sum(-1), matched >= 0, keep, anchors, ratio=math.inf)
    assert chosen.sum(1).tolist() == [128, 128]
    torch.testing.assert_close(got["cls"], (ce.sum(-1) * chosen).sum() / (matched >= 0).sum())


def test_pull_at_prior_is_n_pi_over_one_minus_pi_for_ce_and_falls_with_gamma():
    assert L.pull_at_prior(0, None, 22327) == pytest.approx(22327 * 0.01 / 0.99)  # CE: |dz| = p and 1 - p
    assert L.pull_at_prior(0, 0.75, 1000) == pytest.approx(1000 * 0.01 / 0.99 * 0.25 / 0.75)  # α_t weights
    pulls = [L.pull_at_prior(g, 0.25, 22327) for g in (0.5, 1, 2, 5)]
    assert pulls == sorted(pulls, reverse=True) and pulls[1] > 1 > pulls[2]  # γ = 1 pulls down, γ = 2 up

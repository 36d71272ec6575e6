"""heads.py: torchvision's head with the same weights, output order, and the prior initialisation (§3.3)."""
import math
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead

import model as M
import weights as W
from heads import Head


@pytest.mark.parametrize("norm", [None, "gn"])
def test_heads_equal_torchvision_heads(norm):
    torch.manual_seed(0)
    C, K = 32, 7
    norm_layer = partial(nn.GroupNorm, 32) if norm else None
    for tv, ours in ((RetinaNetClassificationHead(C, 9, K, norm_layer=norm_layer), Head(C, K, norm=norm, prior=0.01)),
                     (RetinaNetRegressionHead(C, 9, norm_layer=norm_layer), Head(C, 4, norm=norm))):
        prefix = "head.classification_head." if isinstance(tv, RetinaNetClassificationHead) else "head.regression_head."
        ours.load_state_dict({W.torchvision_key(prefix + k).split(".", 1)[1]: v for k, v in tv.state_dict().items()})
        features = [torch.randn(2, C, 9, 13), torch.randn(2, C, 5, 7), torch.randn(2, C, 3, 4)]
        torch.testing.assert_close(ours(features), tv(features))


def test_output_order_is_level_y_x_anchor():
    head = Head(32, out_per_anchor=2, num_anchors=3, num_convs=0)
    nn.init.zeros_(head.out.weight)
    with torch.no_grad():
        head.out.bias.copy_(torch.arange(6.0))  # channel a * 2 + d
    out = head([torch.zeros(1, 32, 2, 3), torch.zeros(1, 32, 1, 1)])
    assert out.shape == (1, (6 + 1) * 3, 2)
    assert out[0, :3].tolist() == [[0, 1], [2, 3], [4, 5]]  # location (0, 0) of level 0, anchors 0-2


def test_prior_init_gives_foreground_probability_pi():
    torch.manual_seed(0)
    cfg = M.ModelConfig(num_classes=20, arch="resnet18", norm="bn", freeze_at=0, channels=64)
    model = M.RetinaNet(cfg).eval()
    with torch.no_grad():
        cls_logits, _ = model(torch.randn(2, 3, 128, 128))
    assert abs(torch.sigmoid(cls_logits).mean().item() - 0.01) < 0.001  # §3.3, pi = 0.01
    torch.testing.assert_close(model.cls_head.out.bias, torch.full((9 * 20,), -math.log(99.0)))
    assert (model.box_head.out.bias == 0).all()
    assert abs(model.cls_head.tower[0][0].weight.std().item() - 0.01) < 0.001  # N(0, 0.01), §4.1

"""RetinaNet's classification and box subnets (§4 "RetinaNet Detector", Fig. 3 (c) and (d)).

Each subnet is a small FCN shared by all pyramid levels: four 3x3 convs with C channels and ReLU,
then a 3x3 conv with A*K outputs (class subnet, one sigmoid per class and anchor) or A*4 outputs
(box subnet, class-agnostic deltas). The two subnets share no parameters.

Initialisation (§4.1 "Initialization"): every conv N(0, 0.01) with zero bias, except the last
class conv, whose bias is -log((1 - pi) / pi) so that every anchor starts with foreground
probability pi = 0.01 (§3.3): without it the flood of background anchors swamps the first steps.

Module names follow torchvision's RetinaNetHead: tower.i.0 is its conv.i.0 (and tower.i.1 its
GroupNorm); `out` is its cls_logits / bbox_reg.
"""
import math

import torch
from torch import nn


class Head(nn.Module):
    """forward([P3 ... P7]) -> (N, R, out_per_anchor), anchors ordered level, y, x, anchor."""

    def __init__(self, channels, out_per_anchor, num_anchors=9, num_convs=4, norm=None, prior=None):
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"head norm must be None or 'gn', got {norm!r}")
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)
            # GroupNorm(32) after each tower conv is torchvision v2's head, not the paper's.
            gn = [nn.GroupNorm(32, channels)] if norm == "gn" else []
            layers.append(nn.Sequential(conv, *gn, nn.ReLU(inplace=True)))  # in place, as torchvision: less memory
        self.tower = nn.Sequential(*layers)
        for m in self.tower.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)  # §4.1
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.channels, self.num_anchors = channels, num_anchors
        self.reset_output(out_per_anchor, prior)

    def reset_output(self, out_per_anchor, prior=None):
        """A new output conv with the paper's initialisation (also for fine-tuning to other classes)."""
        self.out_per_anchor = out_per_anchor
        self.out = nn.Conv2d(self.channels, self.num_anchors * out_per_anchor, 3, padding=1)
        nn.init.normal_(self.out.weight, std=0.01)  # §4.1
        nn.init.zeros_(self.out.bias)
        if prior is not None:
            nn.init.constant_(self.out.bias, -math.log((1 - prior) / prior))  # §3.3, prior pi

    def forward(self, features):
        outs = []
        for x in features:
            x = self.out(self.tower(x))  # (N, A*D, H, W), D = out_per_anchor
            N = x.shape[0]
            # channel a*D + d holds anchor a, output d: (N, A*D, H, W) -> (N, H, W, A*D) -> (N, H*W*A, D)
            outs.append(x.permute(0, 2, 3, 1).reshape(N, -1, self.out_per_anchor))
        return torch.cat(outs, dim=1)  # L x (N, H_l*W_l*A, D) -> (N, R, D)

"""Feature Pyramid Network, P3-P7, as RetinaNet uses it (§3.4 "Feature Pyramid Network Backbone", §4).

P3-P5 come from C3-C5 through 1x1 lateral convs, a top-down path of nearest-neighbour upsampling
and 3x3 output convs (Lin et al., FPN). RetinaNet adds P6, a 3x3 stride-2 conv on C5, and P7, a
3x3 stride-2 conv on ReLU(P6); it drops P2 to save computation. All levels have C channels
(256 in the paper).

Module names map torchvision's BackboneWithFPN keys one to one (see weights.from_torchvision):
inner_blocks.i.0 -> lateral.i, layer_blocks.i.0 -> output.i, extra_blocks.p6/p7 -> p6/p7.
"""
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """forward([C3, C4, C5]) -> [P3, P4, P5, P6, P7], each (N, C, H_l, W_l) with H_l = ceil(H / 2^l)."""

    def __init__(self, in_channels=(512, 1024, 2048), channels=256, p6_from="c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.p6_from = p6_from
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        # §4: P6 from C5, as the paper and Detectron do; torchvision v1 takes P6 from P5 (p6_from="p5").
        self.p6 = nn.Conv2d(in_channels[-1] if p6_from == "c5" else channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Uniform(+-sqrt(3 / fan_in)): Detectron's XavierFill, torchvision's kaiming_uniform_(a=1).
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features):
        c3, c4, c5 = features
        inner = self.lateral[2](c5)
        outs = [self.output[2](inner)]
        for i, c in ((1, c4), (0, c3)):  # top-down: coarse to fine
            lateral = self.lateral[i](c)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")  # 2x upsample
            outs.insert(0, self.output[i](inner))
        p6 = self.p6(c5 if self.p6_from == "c5" else outs[-1])
        p7 = self.p7(F.relu(p6))  # §4: ReLU before P7
        return outs + [p6, p7]

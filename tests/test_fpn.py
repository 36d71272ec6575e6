"""fpn.py: P3-P7 against torchvision's FeaturePyramidNetwork + LastLevelP6P7 with the same weights."""
import math

import pytest
import torch
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from fpn import FPN
from weights import torchvision_key


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_fpn_equals_torchvision(p6_from):
    torch.manual_seed(0)
    in_channels, C = (64, 128, 256), 32
    tv = FeaturePyramidNetwork(list(in_channels), C, LastLevelP6P7(in_channels[-1] if p6_from == "c5" else C, C))
    ours = FPN(in_channels, C, p6_from)
    ours.load_state_dict({torchvision_key("backbone.fpn." + k)[4:]: v for k, v in tv.state_dict().items()})
    c = [torch.randn(2, ch, math.ceil(75 / s), math.ceil(101 / s)) for ch, s in zip(in_channels, (8, 16, 32))]
    expected = list(tv({"0": c[0], "1": c[1], "2": c[2]}).values())
    for a, b in zip(ours(c), expected):
        torch.testing.assert_close(a, b)


def test_levels_have_strides_8_to_128_and_c_channels():
    c = [torch.randn(1, ch, math.ceil(75 / s), math.ceil(101 / s)) for ch, s in zip((8, 16, 32), (8, 16, 32))]
    p = FPN((8, 16, 32), channels=16)(c)
    expected = [(16, math.ceil(75 / s), math.ceil(101 / s)) for s in (8, 16, 32, 64, 128)]
    assert [tuple(x.shape[1:]) for x in p] == expected


def test_convs_start_uniform_within_detectron_xavier_bound():
    f = FPN((8, 16, 32), channels=16)
    bound = math.sqrt(3 / (32 * 9))  # fan_in of P6's 3x3 conv on C5
    assert f.p6.weight.abs().max() <= bound and f.p6.weight.abs().max() > 0.9 * bound
    assert (f.p6.bias == 0).all()
    with pytest.raises(ValueError, match="p6_from"):
        FPN(p6_from="c4")

"""anchors.py: generation against hand-computed cases and torchvision, matching, box coding."""
import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import box_iou as tv_box_iou

import anchors as A


def random_boxes(n, size=200.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_anchor_count_is_sum_of_grids_times_nine():
    anchors = A.generate_anchors((100, 130))
    expected = sum(math.ceil(100 / s) * math.ceil(130 / s) * 9 for s in (8, 16, 32, 64, 128))
    assert anchors.shape == (expected, 4)


def test_cell_anchor_sizes_and_ratios_by_hand():
    cell = A.cell_anchors(32)  # ratio-major: (1:2, scales 1, 2^1/3, 2^2/3), (1:1, ...), (2:1, ...)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    scales = torch.tensor([1, 2 ** (1 / 3), 2 ** (2 / 3)] * 3)
    torch.testing.assert_close(w * h, (32 * scales) ** 2)  # area (size * scale)^2
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))
    torch.testing.assert_close(cell[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))  # 1:1, scale 1
    assert torch.equal(cell[:, :2], -cell[:, 2:])  # centred on the origin


def test_anchor_centres_follow_level_y_x_anchor_order():
    H, W = 64, 96
    anchors = A.generate_anchors((H, W))
    W3 = W // 8
    a = anchors[(1 * W3 + 2) * 9 + 4]  # P3, y=1, x=2, anchor 4 (1:1, scale 2^1/3)
    assert torch.allclose((a[:2] + a[2:]) / 2, torch.tensor([16.0, 8.0]))
    assert torch.allclose(a[2] - a[0], torch.tensor(32 * 2 ** (1 / 3)))
    first_p4 = anchors[(H // 8) * W3 * 9 + 3]  # first location of P4, 1:1 anchor of size 64
    assert torch.allclose(first_p4, torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    shifted = A.generate_anchors((H, W), offset=0.5)[(1 * W3 + 2) * 9 + 4]
    assert torch.allclose((shifted[:2] + shifted[2:]) / 2, torch.tensor([20.0, 12.0]))


def test_rounded_anchors_equal_torchvision_anchor_generator():
    H, W = 256, 384  # multiples of 128: torchvision's strides (image // grid) are exact too
    features = [torch.zeros(1, 1, H // s, W // s) for s in (8, 16, 32, 64, 128)]
    tv = _default_anchorgen()(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), features)[0]
    assert torch.equal(A.generate_anchors((H, W), round_=True), tv)


def test_custom_generator_sizes_are_configurable():
    gen = AnchorGenerator(((16, 20, 25),), ((0.5, 1.0, 2.0),))
    ours = A.generate_anchors((64, 64), sizes=(16,), strides=(8,), round_=True)
    tv = gen(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), [torch.zeros(1, 1, 8, 8)])[0]
    assert torch.equal(ours, tv)


def test_box_iou_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    boxes, anchors = random_boxes(7, generator=g), random_boxes(50, generator=g)
    torch.testing.assert_close(A.box_iou(boxes, anchors), tv_box_iou(boxes, anchors))


def test_encode_decode_round_trip_and_torchvision_coder():
    g = torch.Generator().manual_seed(1)
    anchors, boxes = random_boxes(100, generator=g), random_boxes(100, generator=g)
    deltas = A.encode(anchors, boxes)
    torch.testing.assert_close(A.decode(anchors, deltas), boxes, atol=1e-4, rtol=1e-5)  # decode(encode(b)) == b
    coder = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors))
    torch.testing.assert_close(A.decode(anchors, deltas), coder.decode_single(deltas, anchors))


def test_decode_clamps_huge_deltas():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = A.decode(anchor, torch.tensor([[0.0, 0.0, 1e4, 1e4]]))
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box[0, 2] - box[0, 0], torch.tensor(1000.0))  # 16 * exp(log(1000 / 16))


def hand_case():
    anchors = torch.tensor([
        [0, 0, 10, 10],  # IoU 1.0 with box 0: foreground
        [0, 0, 10, 8],  # 0.8: foreground
        [0, 0, 10, 4.5],  # 0.45: ignored
        [5, 5, 15, 15],  # 25 / 175 = 0.14: background
        [200, 200, 230, 230],  # 0.25 with box 1, its best anchor: low-quality foreground
        [100, 100, 110, 110],  # overlaps nothing: background
    ], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 10, 10], [200, 200, 260, 260], [500, 500, 510, 510]], dtype=torch.float32)
    return anchors, boxes


def test_matcher_hand_made_cases():
    anchors, boxes = hand_case()
    valid = torch.tensor([[True, True, True]])
    matched = A.match(anchors, boxes[None], valid)[0]
    # box 2 overlaps no anchor: the zero-IoU guard keeps it from claiming the anchors at IoU 0
    assert matched.tolist() == [0, 0, A.IGNORE, A.BACKGROUND, 1, A.BACKGROUND]
    no_low_quality = A.match(anchors, boxes[None], valid, low_quality=False)[0]
    assert no_low_quality[4].item() == A.BACKGROUND


def test_matcher_image_without_boxes_is_all_background():
    anchors, boxes = hand_case()
    assert (A.match(anchors, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool)) == A.BACKGROUND).all()
    padded = A.match(anchors, boxes[None], torch.tensor([[False, False, False]]))
    assert (padded == A.BACKGROUND).all()


def test_matcher_equals_torchvision_and_batch_equals_each_image():
    g = torch.Generator().manual_seed(2)
    anchors = A.generate_anchors((256, 256))
    gts = [random_boxes(n, size=220, generator=g) for n in (5, 0, 12, 1)]
    labels = [torch.zeros(len(b), dtype=torch.long) for b in gts]
    boxes, _, valid = A.pad_targets(gts, labels)
    batch = A.match(anchors, boxes, valid)
    tv_matcher = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i, gt in enumerate(gts):
        alone = A.match(anchors, gt[None], torch.ones(1, len(gt), dtype=torch.bool))[0]
        assert torch.equal(batch[i], alone)
        if len(gt):  # random boxes all overlap some anchor, so torchvision's matcher applies as is
            assert torch.equal(alone, tv_matcher(tv_box_iou(gt, anchors)))
    assert (batch[1] == A.BACKGROUND).all()


def test_match_is_the_same_in_cpu_and_gpu_sized_passes(monkeypatch):
    g = torch.Generator().manual_seed(3)
    anchors = A.generate_anchors((256, 320))
    gts = [random_boxes(n, size=250, generator=g) for n in (7, 3)]
    boxes, _, valid = A.pad_targets(gts, [torch.zeros(len(b), dtype=torch.long) for b in gts])
    results = []
    for elements in (1 << 10, 1 << 18, 1 << 24):  # 256 anchors a pass, cache-sized (CPU), all at once (GPU)
        monkeypatch.setattr(A, "elements_per_pass", lambda device, e=elements: e)
        results.append(A.match(anchors, boxes, valid))
    assert all(torch.equal(results[0], r) for r in results[1:]) and (results[0] >= 0).any()


def test_pad_targets():
    boxes, labels, valid = A.pad_targets([torch.ones(2, 4), torch.ones(0, 4)], [torch.tensor([3, 4]), torch.zeros(0)])
    assert boxes.shape == (2, 2, 4) and labels.tolist() == [[3, 4], [-1, -1]]
    assert valid.tolist() == [[True, True], [False, False]]


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_anchors_cover_padded_input(offset):
    anchors = A.generate_anchors((128, 256), offset=offset)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres[:, 0].max() < 256 and centres[:, 1].max() < 128 and centres.min() >= 0


def test_the_nearest_anchor_centre_gives_the_best_iou_of_every_anchor():
    """fit_anchors' estimate: each box against each anchor shape at its level's centre nearest the box's centre.
    The overlap falls with the distance along x and along y apart, so that centre is the best of its level, and the
    best over shapes is the best IoU of all the anchors of the image (boxes away from the right and bottom edges,
    whose nearest centre may lie past the grid)."""
    g = torch.Generator().manual_seed(0)
    xy, wh = torch.rand(300, 2, generator=g) * 260, torch.rand(300, 2, generator=g) * 200 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    boxes = boxes[((boxes[:, :2] + boxes[:, 2:]) / 2 < 320).all(1)]  # centres in the grid of a 512 x 512 image
    ratios, scales = (0.2, 1.0, 3.0), (1.0, 1.5)
    estimate = A.nearest_anchor_iou(boxes.double(), *A.anchor_shapes(A.SIZES, scales, ratios)).max(1).values
    exact = A.box_iou(boxes, A.generate_anchors((512, 512), scales=scales, ratios=ratios)).max(1).values
    torch.testing.assert_close(estimate.float(), exact, rtol=1e-5, atol=1e-6)


def test_fit_anchors_finds_the_ratio_of_8_to_1_boxes_and_never_covers_less():
    g = torch.Generator().manual_seed(1)
    h = torch.rand(400, generator=g) * 20 + 12
    xy = torch.rand(400, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.stack([8 * h, h], 1)], 1)  # 8 wide, 1 high
    (sizes, scales, ratios), before, after = A.fit_anchors(boxes)
    assert before < 0.05 and after > 0.95 and min(ratios) <= 0.25  # ratio = height / width
    assert len(sizes) == 5 and all(b == 2 * a for a, b in zip(sizes, sizes[1:])) and len(scales) == len(ratios) == 3
    (_, _, _), before_sq, after_sq = A.fit_anchors(torch.tensor([[10.0, 10.0, 74.0, 74.0], [0.0, 0.0, 32.0, 32.0]]))
    assert before_sq == after_sq == 1.0  # already covered: the search keeps coverage (it only ever moves up)
    xy, wh = torch.rand(3000, 2, generator=g) * 400, torch.rand(3000, 2, generator=g) ** 2 * 300 + 6  # many sizes
    _, before, after = A.fit_anchors(torch.cat([xy, xy + wh], 1), rounds=1)
    assert after >= before  # 3,000 boxes: a mean-IoU bonus weighed against coverage could have traded boxes away

"""study/dense.py: the dense set has COCO's imbalance and hard negatives, fewer classes mean fewer negative samples,
and any written set's imbalance is counted."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from study import dense


def test_the_dense_set_has_cocos_imbalance_and_hard_negatives(tmp_path, capsys):
    # measured as training assigns anchors, at the dense preset's 192 px with its 16-256 px anchors
    root = str(tmp_path / "dense")
    dense.main(dense.get_args_parser().parse_args(["--out", root, "--train", "80", "--val", "4", "--seed", "3"]))
    ds = dense.training_view(root, 192)
    stats = dense.imbalance(ds)
    assert dense.describe(stats) in capsys.readouterr().out  # printed when the set is made
    assert stats["classes"] == 30 and stats["images"] == 80
    assert stats["negative_anchors_per_positive"] >= 500  # COCO at 800 px: ~790
    assert stats["negative_samples_per_positive"] >= 20_000  # COCO: ~63,000
    assert 1.2 <= stats["objects_per_image"] <= 2.0
    boxes = torch.cat([b for b, _ in ds.targets])
    assert (((boxes[:, 2:] - boxes[:, :2]).prod(1)) < 32**2).float().mean() > 0.3  # many small objects
    # hard negatives: glyph-shaped ink outside every labelled box (distractors and parts of glyphs)
    image = torch.from_numpy(np.array(Image.open(os.path.join(root, "train", "000001.jpg")))).float()
    outside = torch.ones(image.shape[:2], dtype=torch.bool)
    for x1, y1, x2, y2 in ds.targets[0][0].round().int().tolist():
        outside[y1:y2, x1:x2] = False
    edges = (image[1:, 1:] - image[:-1, 1:]).abs().sum(-1) + (image[1:, 1:] - image[1:, :-1]).abs().sum(-1)
    assert (edges[outside[1:, 1:]] > 150).sum() > 100


def test_fewer_dense_classes_mean_fewer_negative_samples_per_positive(tmp_path):
    six = dense.make_dense(str(tmp_path / "six"), num_train=40, num_val=2, num_classes=6, seed=3)
    stats = dense.imbalance(dense.training_view(six, 192))
    assert stats["classes"] == 6 and 2_000 < stats["negative_samples_per_positive"] < 20_000
    with pytest.raises(ValueError, match="1 to 30 classes"):
        dense.make_dense(str(tmp_path / "x"), num_classes=31)


def test_the_count_command_prints_any_sets_imbalance(tiny_shapes, capsys):
    dense.main(dense.get_args_parser().parse_args(["--count", tiny_shapes, "--size", "96"]))
    stats = dense.imbalance(dense.training_view(tiny_shapes, 96))
    assert capsys.readouterr().out.strip() == f"{tiny_shapes}: {dense.describe(stats)}" and stats["classes"] == 4

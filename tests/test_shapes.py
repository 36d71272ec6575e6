"""shapes.py: the synthetic set is deterministic, mostly background, and safe to write from several processes."""
import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import shapes
from conftest import ROOT


def test_shapes_set_is_deterministic_and_mostly_background(tmp_path):
    a = shapes.make_shapes(str(tmp_path / "a"), num_train=6, num_val=2, size=96, seed=5)
    b = shapes.make_shapes(str(tmp_path / "b"), num_train=6, num_val=2, size=96, seed=5)
    assert filecmp.cmp(D.coco_paths(a, "train")[0], D.coco_paths(b, "train")[0], shallow=False)
    assert filecmp.cmp(os.path.join(a, "train", "000003.jpg"), os.path.join(b, "train", "000003.jpg"), shallow=False)
    ds = D.CocoDetection(*D.coco_paths(a, "train"))
    boxes = torch.cat([bx for bx, _ in ds.targets])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert len(ds.class_names) == 4 and len(boxes) >= 6
    assert areas.sum() < 0.5 * 6 * 96 * 96  # far more background than object


def test_two_processes_writing_one_folder_at_once_leave_the_set_one_process_writes(tmp_path):
    # the nodes of a multi-node run each write the quick start's set; on a shared filesystem, into one folder
    code = "import sys, shapes; shapes.make_shapes(sys.argv[1], num_train=60, num_val=10, size=96, seed=2)"
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    alone = shapes.make_shapes(str(tmp_path / "alone"), num_train=60, num_val=10, size=96, seed=2)
    shared = str(tmp_path / "shared")
    for split, count in (("train", 60), ("val", 10)):
        a, b = os.path.join(shared, split), os.path.join(alone, split)
        names = sorted(os.listdir(a))
        assert names == sorted(os.listdir(b)) and len(names) == count  # and no temporary file left
        assert filecmp.cmpfiles(a, b, names, shallow=False)[0] == names
        assert filecmp.cmp(D.coco_paths(shared, split)[0], D.coco_paths(alone, split)[0], shallow=False)


def test_the_dense_set_has_cocos_imbalance_and_hard_negatives(tmp_path, capsys):
    # measured as training assigns anchors, at the dense preset's 192 px with its 16-256 px anchors
    root = str(tmp_path / "dense")
    shapes.main(shapes.get_args_parser().parse_args(["--preset", "dense", "--out", root, "--train", "80", "--val",
                                                     "4", "--seed", "3"]))
    ds = shapes.training_view(root, 192)
    stats = shapes.imbalance(ds)
    assert shapes.describe(stats) in capsys.readouterr().out  # printed when the set is made
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
    six = shapes.make_dense(str(tmp_path / "six"), num_train=40, num_val=2, num_classes=6, seed=3)
    stats = shapes.imbalance(shapes.training_view(six, 192))
    assert stats["classes"] == 6 and 2_000 < stats["negative_samples_per_positive"] < 20_000
    with pytest.raises(ValueError, match="1 to 30 classes"):
        shapes.make_dense(str(tmp_path / "x"), num_classes=31)

"""shapes.py: the quick start's set is deterministic, mostly background, and safe to write from several processes."""
import filecmp
import os
import subprocess
import sys

import torch

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

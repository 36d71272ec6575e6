"""evaluate.py: labels become category ids through the checkpoint's own ids, a model of other classes is
refused, the ground truth scores AP 1, and the per-class table means to pycocotools' AP."""
import dataclasses
import json

import pytest
import torch
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

import data as D
import evaluate as E
import model as M
import weights as W
from conftest import shared_path


def coco_subset():
    return D.CocoDetection(*D.coco_paths(shared_path("coco_val2017_subset"), "val2017"))


def torchvision_cfg():
    """The config load_torchvision gives torchvision's COCO model: 91 outputs, label = COCO category id."""
    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return dataclasses.replace(W.torchvision_config(1, 91, names), category_ids=tuple(range(91)))


def test_a_torchvision_model_scores_ap_1_with_the_ground_truth_as_its_detections(monkeypatch, tmp_path, capsys):
    # torchvision's labels are category ids (up to 90): mapped through the dataset's 80 ids they raised
    # IndexError or named the wrong category. Its detections here are the ground truth, so AP must be 1.
    ds = coco_subset()
    truth = iter(ds.targets)

    def detect(model, images, score_thresh=None, amp=False):  # model.detect's signature
        return [{"boxes": b, "scores": torch.ones(len(b)), "labels": torch.tensor([ds.cat_ids[i] for i in lab.tolist()],
                 dtype=torch.long)} for b, lab in (next(truth) for _ in images)]

    monkeypatch.setattr(E.M, "detect", detect)
    stats = E.evaluate(type("Model", (), {"cfg": torchvision_cfg()})(), ds, out_dir=str(tmp_path))
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    saved = json.load(open(tmp_path / "eval.json"))  # the 12 numbers and the per-class table, printed too
    assert saved == stats and all(r["AP"] == pytest.approx(1.0) for r in saved["per_class"] if r["boxes"])
    assert "per-class AP, worst first" in capsys.readouterr().out


def test_category_ids_of_models_trained_on_the_dataset_or_on_coco():
    ds = coco_subset()
    assert E.category_ids(torchvision_cfg(), ds) == tuple(range(91))
    own = M.ModelConfig(num_classes=80, class_names=ds.class_names, category_ids=tuple(ds.cat_ids))
    assert E.category_ids(own, ds) == tuple(ds.cat_ids)
    assert E.category_ids(M.ModelConfig(num_classes=80), ds) == tuple(ds.cat_ids)  # no ids saved: the dataset's


def test_a_model_of_other_classes_is_refused_with_the_file_named():
    ds = coco_subset()
    shapes_cfg = M.ModelConfig(num_classes=4, class_names=("ellipse", "rectangle", "triangle", "cross"),
                               category_ids=(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"instances_val2017.json: the model's classes are not this dataset's: "
                                         r"category 1 \('person'\) is 'ellipse' in the checkpoint \(4 classes"):
        E.category_ids(shapes_cfg, ds)
    renamed = dataclasses.replace(torchvision_cfg(), category_ids=tuple(range(1, 92)))  # ids off by one
    with pytest.raises(ValueError, match=r"category 1 \('person'\) is '__background__'"):
        E.category_ids(renamed, ds)
    with pytest.raises(ValueError, match=r"80 categories here, 4 in the checkpoint"):
        E.category_ids(M.ModelConfig(num_classes=4), ds)
    with pytest.raises(ValueError, match=r"category 5 \('airplane'\) is unknown"):
        E.category_ids(dataclasses.replace(torchvision_cfg(), num_classes=5, category_ids=tuple(range(5)),
                                           class_names=torchvision_cfg().class_names[:5]), ds)


def test_ground_truth_fed_back_as_detections_scores_ap_1():
    ds = coco_subset()
    detections = [{"boxes": b, "scores": torch.ones(len(b)), "labels": lab} for b, lab in ds.targets]
    stats = E.coco_evaluate(ds.coco, E.coco_results(detections, ds.ids, ds.cat_ids), image_ids=ds.ids)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_coco_results_are_xywh_with_category_ids():
    det = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([1])}]
    assert E.coco_results(det, [42], [3, 7]) == [{"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0],
                                                  "score": 0.5}]
    assert E.coco_evaluate(None, [])["AP"] == 0.0


def test_per_class_ap_means_to_pycocotools_ap_worst_first():
    """Imperfect detections on the 20 COCO photos (the truth shifted, a third dropped, random scores): the mean of
    the per-class APs over the classes with boxes is pycocotools' AP (and AP50's its AP50); rows are worst first,
    the categories without a box in these photos last with AP None."""
    ds, g = coco_subset(), torch.Generator().manual_seed(0)
    detections = []
    for boxes, labels in ds.targets:
        keep = torch.arange(len(boxes)) % 3 != 0
        shift = torch.randn(len(boxes), 4, generator=g) * 0.1 * (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        detections.append({"boxes": (boxes + shift)[keep], "scores": torch.rand(len(boxes), generator=g)[keep],
                           "labels": labels[keep]})
    stats = E.coco_evaluate(ds.coco, E.coco_results(detections, ds.ids, ds.cat_ids), image_ids=ds.ids)
    rows = stats["per_class"]
    scored = [r for r in rows if r["AP"] is not None]
    assert 0.1 < stats["AP"] < 0.9 and len(scored) == len({lab for _, labels in ds.targets for lab in labels.tolist()})
    assert sum(r["AP"] for r in scored) / len(scored) == pytest.approx(stats["AP"], abs=1e-12)
    assert sum(r["AP50"] for r in scored) / len(scored) == pytest.approx(stats["AP50"], abs=1e-12)
    assert [r["AP"] for r in scored] == sorted(r["AP"] for r in scored) and rows[len(scored):] == [
        r for r in rows if r["AP"] is None] and all(r["boxes"] == 0 for r in rows[len(scored):])
    assert sum(r["boxes"] for r in rows) == sum(len(b) for b, _ in ds.targets)
    table = E.format_per_class(rows).splitlines()
    assert table[2].split()[-2] == scored[0]["name"].split()[-1] and table[-1].split()[:2] == ["n/a", "n/a"]

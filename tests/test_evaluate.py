"""engine.py's evaluation: labels become category ids through the checkpoint's own ids, and a model of other
classes is refused."""
import dataclasses

import pytest
import torch
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

import data as D
import engine as E
import model as M
import weights as W
from conftest import shared_path


def coco_subset():
    return D.CocoDetection(*D.coco_paths(shared_path("coco_val2017_subset"), "val2017"))


def torchvision_cfg():
    """The config load_torchvision gives torchvision's COCO model: 91 outputs, label = COCO category id."""
    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return dataclasses.replace(W.torchvision_config(1, 91, names), category_ids=tuple(range(91)))


def test_a_torchvision_model_scores_ap_1_with_the_ground_truth_as_its_detections(monkeypatch):
    # torchvision's labels are category ids (up to 90): mapped through the dataset's 80 ids they raised
    # IndexError or named the wrong category. Its detections here are the ground truth, so AP must be 1.
    ds = coco_subset()
    truth = iter(ds.targets)

    def detect(model, images, score_thresh=None, amp=False):  # model.detect's signature
        return [{"boxes": b, "scores": torch.ones(len(b)), "labels": torch.tensor([ds.cat_ids[i] for i in lab.tolist()],
                 dtype=torch.long)} for b, lab in (next(truth) for _ in images)]

    monkeypatch.setattr(E.M, "detect", detect)
    stats = E.evaluate(type("Model", (), {"cfg": torchvision_cfg()})(), ds)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


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

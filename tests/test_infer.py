"""infer.py: pictures as people have them, bad files, COCO JSON, equality with detect(), torchvision weights."""
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.models.detection import retinanet_resnet50_fpn

import data as D
import infer
import model as M
import weights as W
from conftest import ROOT, shared_path
from evaluate import coco_evaluate, evaluate


def args(*words):
    return infer.get_args_parser().parse_args([str(w) for w in words])


def exif_rotated(path, array, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: the camera was turned; viewers rotate 90 degrees clockwise
    Image.fromarray(array).save(path, exif=exif, quality=95)


@pytest.fixture(scope="module")
def mixed_folder(tiny_shapes, tmp_path_factory):
    """Good pictures of every kind people have, and bad files, in one folder."""
    folder = tmp_path_factory.mktemp("mixed")
    shape = np.array(Image.open(os.path.join(tiny_shapes, "val", "000001.jpg")))
    Image.fromarray(shape).save(folder / "good.jpg")
    Image.fromarray(np.dstack([shape, np.full(shape.shape[:2], 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray(shape.mean(2).astype(np.uint8)).save(folder / "gray.png")
    Image.fromarray((shape[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")  # 16-bit
    Image.fromarray(shape).convert("CMYK").save(folder / "cmyk.jpg")
    exif_rotated(folder / "rotated.jpg", shape[:, :60])
    (folder / "notes.jpg").write_text("not a picture")
    data = open(folder / "good.jpg", "rb").read()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated
    return folder


def test_folder_of_good_and_bad_files_reports_each_bad_one_and_exits_1(mixed_folder, tiny_checkpoint, tmp_path):
    out, det_json = tmp_path / "out", tmp_path / "det.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), str(mixed_folder), "missing.jpg",
                           "--weights", tiny_checkpoint, "--out", str(out), "--json", str(det_json),
                           "--score-thresh", "0.05"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(any(n in e for e in errors) for n in ("notes.jpg", "cut.jpg", "missing.jpg"))
    made = sorted(os.listdir(out))
    assert made == ["alpha.jpg", "cmyk.jpg", "deep.jpg", "good.jpg", "gray.jpg", "rotated.jpg"]
    assert Image.open(out / "rotated.jpg").size == (96, 60)  # EXIF orientation applied: 60 wide -> 96 wide
    results = json.load(open(det_json))
    assert results and {r["file_name"] for r in results} <= set(made) | {"alpha.png", "gray.png", "deep.png"}


def test_json_loads_with_pycocotools_and_scores_like_train_evaluate(tiny_shapes, tiny_checkpoint, tmp_path):
    det_json = tmp_path / "det.json"
    infer.main(args(os.path.join(tiny_shapes, "val"), "--weights", tiny_checkpoint, "--out", tmp_path / "o",
                    "--json", det_json, "--score-thresh", "0.05", "--amp", "off"))  # evaluate's float32
    gt = COCO(D.coco_paths(tiny_shapes, "val")[0])
    gt.loadRes(str(det_json))  # image ids are the COCO ids of the file names
    model = W.load_checkpoint(tiny_checkpoint)
    ds = D.CocoDetection(*D.coco_paths(tiny_shapes, "val"))
    expected = evaluate(model, ds)
    assert coco_evaluate(ds.coco, json.load(open(det_json)), image_ids=ds.ids) == expected


@pytest.mark.parametrize("amp", ["off", "on"])
def test_infer_detections_equal_detect(tiny_shapes, tiny_checkpoint, tmp_path, amp):
    path = os.path.join(tiny_shapes, "val", "000002.jpg")
    by_path, failed = infer.main(args(path, "--weights", tiny_checkpoint, "--out", tmp_path, "--score-thresh", "0.1",
                                      "--amp", amp))
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    # the model infer.py runs (BN folded into the convs: test_model holds that to the unfolded one's outputs;
    # the boxes of the two differ by float32 rounding, 1.3e-5 px seen on an Intel AMX host), in float32 or under
    # bfloat16 autocast as --amp says
    expected = M.detect(infer.load_model(tiny_checkpoint), [image], score_thresh=0.1, amp=amp == "on")[0]
    assert failed == 0 and len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(by_path[path][key], expected[key])


def test_load_image_handles_the_kinds_of_pictures_people_have(mixed_folder, tiny_shapes):
    source = np.array(Image.open(os.path.join(tiny_shapes, "val", "000001.jpg")))  # what the folder was made from
    good = torch.from_numpy(source).permute(2, 0, 1)
    alpha = infer.load_image(mixed_folder / "alpha.png")[0]  # alpha 128 over white
    torch.testing.assert_close(alpha.float(), (good.float() * 128 + 255 * 127) / 255, atol=6, rtol=0)
    gray = infer.load_image(mixed_folder / "gray.png")[0]
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1])
    deep = infer.load_image(mixed_folder / "deep.png")[0]  # 16-bit: v * 257 -> v
    assert torch.equal(deep[0], good[0])
    cmyk = infer.load_image(mixed_folder / "cmyk.jpg")[0]
    assert (cmyk.float() - good.float()).abs().mean() < 8
    rotated = infer.load_image(mixed_folder / "rotated.jpg")[0]
    raw = np.array(Image.open(mixed_folder / "rotated.jpg"))  # as stored, 96 high x 60 wide
    assert rotated.shape == (3, 60, 96)
    assert (rotated.permute(1, 2, 0).float() - torch.from_numpy(np.rot90(raw, -1).copy()).float()).abs().mean() < 1


def test_very_large_photo_is_decoded_reduced_and_boxes_come_back_in_its_pixels(tiny_checkpoint, tmp_path):
    big = np.zeros((3000, 5000, 3), np.uint8)
    big[1000:2000, 1500:3000] = (250, 30, 30)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    image, scale = infer.load_image(tmp_path / "big.jpg", limit=800)
    assert max(image.shape[1:]) <= 1600 and scale == pytest.approx(5000 / image.shape[2])
    by_path, _ = infer.main(args(tmp_path / "big.jpg", "--weights", tiny_checkpoint, "--out", tmp_path / "o",
                                 "--score-thresh", "0.01"))
    boxes = by_path[str(tmp_path / "big.jpg")]["boxes"]
    assert len(boxes) and boxes[:, 2].max() > 1600 and boxes[:, 2].max() <= 5000 + 1e-3


def test_real_demo_photos_run_without_error(tiny_checkpoint, tmp_path):
    folder = shared_path("demo")
    by_path, failed = infer.main(args(folder, "--weights", tiny_checkpoint, "--out", tmp_path, "--batch-size", 3))
    assert failed == 0 and len(by_path) == len(os.listdir(folder)) == len(os.listdir(tmp_path))
    assert any(Image.open(os.path.join(folder, f)).mode == "L" for f in os.listdir(folder))  # grayscale among them


def test_bad_checkpoints_fail_in_one_line(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt: not a checkpoint"):
        infer.load_model(str(text))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a checkpoint of this project"):
        infer.load_model(str(tmp_path / "other.pt"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "x.jpg", "--weights", str(text)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "notes.pt" in proc.stderr


def test_default_checkpoint_missing_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python train.py"):
        infer.load_model()


def test_torchvision_weights_offline_fail_at_once_in_one_line(monkeypatch):
    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="retinanet_resnet50_fpn_coco") as e:
        infer.load_model("torchvision")
    assert "\n" not in str(e.value)


def test_torchvision_weights_label_with_coco_names(monkeypatch, tmp_path):
    torch.manual_seed(0)
    state = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    monkeypatch.setattr(W, "download_state_dict", lambda url, alternative: state)  # stands in for the download
    model = infer.load_model("torchvision")
    assert model.cfg.class_names[1] == "person" and model.cfg.num_classes == 91 and model.cfg.category_ids[1] == 1
    assert model.cfg.p6_from == "p5" and model.cfg.round_anchors


def test_score_threshold_1_gives_no_detection_and_0_every_candidate(tiny_shapes, tiny_checkpoint, tmp_path):
    path = os.path.join(tiny_shapes, "val", "000002.jpg")
    none, _ = infer.main(args(path, "--weights", tiny_checkpoint, "--out", tmp_path, "--score-thresh", "1.0"))
    every, _ = infer.main(args(path, "--weights", tiny_checkpoint, "--out", tmp_path, "--score-thresh", "0"))
    assert len(none[path]["boxes"]) == 0 and len(every[path]["boxes"]) == 100  # model.inference.max_detections
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), path, "--weights", tiny_checkpoint,
                           "--out", str(tmp_path), "--score-thresh", "1.5"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: score threshold must be in [0, 1], got 1.5"

"""export.py: ONNX Runtime and the torch.export program give the module's outputs and infer.py's detections,
for the quick start's architecture and torchvision's ResNet-50; bad files fail in one line naming them."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.models.detection import retinanet_resnet50_fpn

import data as D
import export
import fig4
import infer
import model as M
import weights as W
from conftest import ROOT, run, shared_path
from loss import LossConfig
from tools import bench_pairs


def close(expected, got, rel=1e-4):
    """max |diff| within rel of the outputs' scale, for each of (cls_logits, box_deltas)."""
    for e, g in zip(expected, got):
        assert e.shape == g.shape and (e - g).abs().max() <= rel * e.abs().max(), (e - g).abs().max()


def same_detections(expected, got):
    """tools/bench.py's check: as many detections, each with a partner of its label, box within 1e-3 px, score
    within 1e-4."""
    assert list(expected) == list(got)
    ok, message = bench_pairs.same_detections(list(expected.values()), list(got.values()), score_atol=1e-4,
                                              box_rtol=0)
    assert ok, message


def detections(paths, weights, out, thresh="0.05"):
    by_path, failed = infer.main(infer.get_args_parser().parse_args(
        [*map(str, paths), "--weights", str(weights), "--out", str(out), "--score-thresh", thresh,
         "--amp", "off"]))  # ONNX Runtime runs float32: so must the module it is compared with
    assert failed == 0
    return by_path


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "tiny.onnx")
    export.main(export.get_args_parser().parse_args(["--weights", tiny_checkpoint, "--out", out]))
    return tiny_checkpoint, out


@pytest.fixture(scope="module")
def odd_pictures(tmp_path_factory):
    """1-channel, tiny and very wide pictures: the cases infer.py's preprocessing must carry to both engines."""
    folder, g = tmp_path_factory.mktemp("odd"), np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (70, 90), dtype=np.uint8)).save(folder / "gray.png")  # mode L
    Image.fromarray(g.integers(0, 255, (3, 5, 3), dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(g.integers(0, 255, (20, 900, 3), dtype=np.uint8)).save(folder / "wide.png")
    return folder


def test_onnx_and_program_outputs_equal_the_module_at_other_batch_sizes_and_sizes(exported):
    checkpoint, onnx_path = exported
    model, onnx_model = infer.load_model(checkpoint), infer.load_model(onnx_path)
    program = torch.export.load(onnx_path[:-5] + ".pt2").module()
    for shape in ((1, 3, 160, 160), (3, 3, 192, 160), (2, 3, 160, 352), (1, 3, 96, 96), (2, 3, 32, 320)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))  # traced with (2, 3, 160, 160)
        with torch.no_grad():
            expected = model(x)
            if min(shape[2:]) >= export.MIN_SIDE:  # the program refuses smaller sides (P7 of 1x1): its guard
                close(expected, program(x))
        close(expected, onnx_model(x))  # ONNX at every size
    with pytest.raises(Exception, match="Guard failed"):
        program(torch.randn(1, 3, 96, 96))


def test_onnx_file_alone_carries_the_config_and_infer_gives_the_same_detections(exported, tiny_shapes, odd_pictures,
                                                                                 tmp_path):
    checkpoint, onnx_path = exported
    assert W.load_checkpoint(onnx_path).cfg == W.load_checkpoint(checkpoint).cfg  # classes, ids, scale, anchors
    paths = [os.path.join(tiny_shapes, "val", f) for f in sorted(os.listdir(os.path.join(tiny_shapes, "val")))]
    paths += [shared_path("demo"), odd_pictures]
    expected = detections(paths, checkpoint, tmp_path / "pt")
    assert sum(len(d["boxes"]) for d in expected.values()) > 0
    same_detections(expected, detections(paths, onnx_path, tmp_path / "onnx"))


def test_torchvision_resnet50_exports_with_equal_outputs_and_detections(monkeypatch, tmp_path):
    torch.manual_seed(0)
    state = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()  # random: no download in tests
    with torch.no_grad():
        state["head.classification_head.cls_logits.bias"].fill_(-2.5)  # scores above 0.05: real postprocessing
    monkeypatch.setattr(W, "download_state_dict", lambda url, alternative: state)
    model = W.load_checkpoint("torchvision").for_inference()
    model.cfg.min_size, model.cfg.max_size = 320, 480  # a smaller test scale keeps the test short
    onnx_path = tmp_path / "r50.onnx"
    export.export_onnx(model, str(onnx_path))
    program = export.export_program(model, str(tmp_path / "r50.pt2")).module()
    x = torch.randn(1, 3, 320, 480)
    with torch.no_grad():
        expected = model(x)
        close(expected, program(x))
    onnx_model = W.load_checkpoint(str(onnx_path))
    close(expected, onnx_model(x))
    images = [infer.load_image(os.path.join(shared_path("demo"), f))[0] for f in ("chelsea.png", "camera.png")]
    want, got = M.detect(model, images), M.detect(onnx_model, images)
    assert all(len(d["boxes"]) == 100 for d in want)
    same_detections(dict(enumerate(want)), dict(enumerate(got)))


def test_bad_onnx_files_fail_in_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx: no such ONNX file"):
        infer.load_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="notes.onnx: not an ONNX model"):
        infer.load_model(str(tmp_path / "notes.onnx"))
    other = tmp_path / "other.onnx"  # a valid ONNX file of some other network: no metadata
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),), str(other), dynamo=True)
    with pytest.raises(ValueError, match="other.onnx: an ONNX model without this project's metadata"):
        infer.load_model(str(other))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "x.jpg", "--weights", str(other)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "other.onnx" in proc.stderr
    with pytest.raises(ValueError, match="model.pt: the output must end in .onnx"):
        export.main(export.get_args_parser().parse_args(["--out", str(tmp_path / "model.pt")]))


def test_exported_model_of_other_classes_is_refused_in_evaluation(exported, tmp_path):
    coco = shared_path("coco_val2017_subset")
    with pytest.raises(ValueError, match=r"tiny.onnx: .*instances_val2017.json: the model's classes are not this"):
        run(coco, str(tmp_path / "ev"), **{"eval-only": True, "weights": exported[1], "val-split": "val2017"})
    assert not os.path.exists(tmp_path / "ev" / "eval.json")


def test_fig4_runs_an_onnx_model_as_the_checkpoint(exported, tiny_shapes):
    ds = D.CocoDetection(*D.coco_paths(tiny_shapes, "val"), train=True, min_size=96, max_size=96, flip=0.0)
    got, want = (fig4.collect_logits(infer.load_model(w), ds, progress=lambda x, total: x) for w in exported[::-1])
    for key in ("pos", "neg"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-4 * np.abs(want[key]).max())


def test_export_refuses_an_onnx_input_and_foreign_metadata(exported, tmp_path):
    with pytest.raises(ValueError, match="tiny.onnx: already exported"):
        export.main(export.get_args_parser().parse_args(["--weights", exported[1], "--out", str(tmp_path / "x.onnx")]))
    proto = onnx.load(exported[1])
    next(p for p in proto.metadata_props if p.key == W.ONNX_CONFIG_KEY).value = '{"no_such_field": 1}'
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(ValueError, match="future.onnx: its 'retinanet_config' metadata is no config of this project"):
        infer.load_model(str(tmp_path / "future.onnx"))


def test_an_onnx_file_exported_before_the_configs_were_apart_still_loads(exported, tiny_shapes, tmp_path):
    """Until issue 33, export.py wrote the one flat config of its day (network, loss and inference fields) as the
    whole metadata: each config takes its fields from it, the file's own score threshold included."""
    new = W.load_checkpoint(exported[1])
    flat = {**dataclasses.asdict(new.cfg), **dataclasses.asdict(LossConfig()),
            **dataclasses.asdict(new.inference), "score_thresh": 0.2}
    proto = onnx.load(exported[1])
    next(p for p in proto.metadata_props if p.key == W.ONNX_CONFIG_KEY).value = json.dumps(flat)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = W.load_checkpoint(str(tmp_path / "old.onnx"))
    assert old.cfg == new.cfg and old.inference.score_thresh == 0.2
    image = D.CocoDetection(*D.coco_paths(tiny_shapes, "val"))[0][0]
    want, got = M.detect(new, [image], score_thresh=0.2)[0], M.detect(old, [image])[0]
    assert all(torch.equal(want[k], got[k]) for k in want)

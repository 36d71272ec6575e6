"""convert.py: the 20 real COCO photos written out as VOC, YOLO and CSV and read back give the same boxes and
classes (and, fed back as detections, AP 1.000); bad input names the file and its line and writes nothing; a
converted set trains with train.py."""
import json
import os

import pytest
import torch

import convert
import data as D
from conftest import run, shared_path
from evaluate import coco_evaluate


def coco_subset():
    return D.coco_paths(shared_path("coco_val2017_subset"), "val2017")


def read_back(fmt, folder, images):
    if fmt == "voc":
        return convert.read_voc(folder, images, os.path.join(folder, "classes.txt"))
    if fmt == "yolo":
        return convert.read_yolo(folder, images, os.path.join(folder, "classes.txt"))
    return convert.read_csv(os.path.join(folder, "annotations.csv"), os.path.join(folder, "classes.csv"))


@pytest.mark.parametrize("fmt,tol", [("voc", 1e-6), ("yolo", 2e-3), ("csv", 1e-6)])  # YOLO: 7 decimals of the size
def test_coco_photos_round_trip_through_each_format_to_the_same_boxes_and_ap_1(tmp_path, fmt, tol):
    ann, images = coco_subset()
    gt = D.load_coco(ann)
    assert convert.write_from_coco(ann, images, fmt, str(tmp_path)) == 253  # 257 boxes, 4 of them crowds
    pictures, names, folder = read_back(fmt, str(tmp_path), images)
    coco = convert.to_coco(pictures, names)
    by_file = {os.path.basename(im["file_name"]): im for im in gt.imgs.values()}
    assert sorted(os.path.basename(p[0]) for p in pictures) == sorted(by_file)
    results = []
    for file_name, width, height, objects in pictures:
        original = by_file[os.path.basename(file_name)]
        assert (width, height) == (original["width"], original["height"])
        assert os.path.exists(os.path.join(folder, file_name))
        truth = sorted((gt.cats[a["category_id"]]["name"], a["bbox"]) for a in gt.imgToAnns[original["id"]]
                       if not a["iscrowd"])
        mine = sorted((label, [x1, y1, x2 - x1, y2 - y1]) for (x1, y1, x2, y2), label in objects)
        assert [n for n, _ in mine] == [n for n, _ in truth]
        torch.testing.assert_close(torch.tensor([b for _, b in mine]).reshape(-1, 4),
                                   torch.tensor([b for _, b in truth]).reshape(-1, 4), rtol=0, atol=tol)
        id_of = {c["name"]: c["id"] for c in gt.dataset["categories"]}
        results += [{"image_id": original["id"], "category_id": id_of[label], "bbox": list(box), "score": 1.0}
                    for label, box in mine]
    stats = coco_evaluate(gt, results)  # the converted set, as detections against the original
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert len(coco["annotations"]) == 253 and {c["name"] for c in coco["categories"]} <= set(id_of)


def make_pictures(folder, names=("a.jpg", "b.jpg"), size=(64, 48)):
    os.makedirs(folder, exist_ok=True)
    from PIL import Image

    for name in names:
        Image.new("RGB", size).save(os.path.join(folder, name))
    return str(folder)


def voc(name, box, width=64, height=48):
    x1, y1, x2, y2 = box
    return (f"<annotation>\n<filename>a.jpg</filename>\n<size><width>{width}</width><height>{height}</height></size>\n"
            f"<object>\n<name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox>\n"
            f"</object>\n<object>\n<name>{name}</name>\n<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox>\n</object>\n</annotation>\n")


@pytest.mark.parametrize("fmt,content,message", [
    ("voc", voc("dog", (5, 5, 70, 20)), r"a\.xml:7: box \(4, 4, 70, 20\) outside its 64x48 picture"),
    ("voc", voc("dog", (20, 5, 19, 9)), r"a\.xml:7: empty box"),  # xmin = xmax is 1 px wide (1-based)
    ("voc", voc("cow", (5, 5, 9, 9)), r"a\.xml:7: class 'cow' is not in .*classes\.txt"),
    ("yolo", "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.4 0.2\n", r"a\.txt:2: class 1 is not in .*classes\.txt \(1 names"),
    ("yolo", "0 0.5 0.5 0.2 0.2\n\n0 0.9 0.5 0.4 0.2\n", r"a\.txt:3: box .* outside its 64x48 picture"),
    ("yolo", "0 0.5 0.5 0.2\n", r"a\.txt:1: not 'class cx cy w h'"),
    ("csv", "a.jpg,1,1,9,9,cat\nb.jpg,,,,,\nc.jpg,1,1,9,9,cat\n", r"ann\.csv:3: picture .*c\.jpg cannot be read"),
    ("csv", "a.jpg,1,1,9,9,cat\na.jpg,9,1,3,9,cat\n", r"ann\.csv:2: empty box"),
    ("csv", "a.jpg,1,1,9,9,dog\n", r"ann\.csv:1: class 'dog' is not in .*classes\.csv"),
    ("csv", "a.jpg,1,1,9\n", r"ann\.csv:1: not 'path,x1,y1,x2,y2,class' \(4 fields\)"),
])
def test_bad_input_names_the_file_and_line_and_writes_nothing(tmp_path, fmt, content, message):
    pictures = make_pictures(tmp_path)
    source, classes = {"voc": ("a.xml", "classes.txt"), "yolo": ("a.txt", "classes.txt"),
                       "csv": ("ann.csv", "classes.csv")}[fmt]
    (tmp_path / source).write_text(content)
    (tmp_path / classes).write_text("cat,0\n" if fmt == "csv" else "cat\ndog\n" if fmt == "voc" else "cat\n")
    out = tmp_path / "out.json"
    words = [fmt, str(tmp_path / source) if fmt == "csv" else str(tmp_path), "--classes", str(tmp_path / classes),
             "--out", str(out)] + (["--images", pictures] if fmt != "csv" else [])
    with pytest.raises(ValueError, match=message):
        convert.main(convert.get_args_parser().parse_args(words))
    assert not out.exists()


def test_a_label_file_without_its_picture_and_a_missing_voc_picture_are_named(tmp_path):
    make_pictures(tmp_path / "img", names=("a.jpg",))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "zz.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "names.txt").write_text("cat\n")
    with pytest.raises(ValueError, match=r"labels/zz\.txt: no picture zz\.\* in"):
        convert.read_yolo(str(tmp_path / "labels"), str(tmp_path / "img"), str(tmp_path / "names.txt"))
    (tmp_path / "x.xml").write_text(voc("cat", (2, 2, 8, 8)).replace("a.jpg", "gone.jpg"))
    with pytest.raises(ValueError, match=r"x\.xml: picture .*gone\.jpg cannot be read"):
        convert.read_voc(str(tmp_path), str(tmp_path / "img"))


def test_voc_edges_are_one_based_and_a_box_one_pixel_over_the_edge_is_clipped(tmp_path):
    """VOC's xmin 1 .. xmax W covers the whole row: x1 = xmin - 1 = 0, x2 = W (detectron2). LabelImg's 0 and W + 1
    are clipped to the picture, not refused."""
    make_pictures(tmp_path)
    (tmp_path / "a.xml").write_text(voc("cat", (0, 1, 65, 48)))
    pictures, names, _ = convert.read_voc(str(tmp_path))
    assert names == ["cat"] and pictures[0][3] == [((0.0, 0.0, 10.0, 10.0), "cat"), ((0.0, 0.0, 64.0, 48.0), "cat")]


def test_val_fraction_holds_out_pictures_and_train_py_trains_on_the_converted_set(tiny_shapes, tmp_path):
    """The shapes set out to VOC and back into two COCO files (--val-fraction), which train.py reads by
    --train-ann/--val-ann without --data: the worked example of the README in small."""
    ann, images = D.coco_paths(tiny_shapes, "train")
    convert.main(convert.get_args_parser().parse_args(["coco", ann, "--images", images, "--to", "voc", "--out",
                                                        str(tmp_path / "voc")]))
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"{c['name']}\n" for c in json.load(open(ann))["categories"]))
    train_json, val_json = str(tmp_path / "train.json"), str(tmp_path / "val.json")
    convert.main(convert.get_args_parser().parse_args(["voc", str(tmp_path / "voc"), "--images", images, "--classes",
                                                        str(names), "--out", train_json, "--val-fraction", "0.25",
                                                        "--val-out", val_json, "--seed", "1"]))
    train, val = (json.load(open(p)) for p in (train_json, val_json))
    assert (len(train["images"]), len(val["images"])) == (6, 2) and train["categories"] == val["categories"]
    files = {i["file_name"] for i in train["images"]} | {i["file_name"] for i in val["images"]}
    assert files == set(os.listdir(images))
    assert len(train["annotations"]) + len(val["annotations"]) == len(json.load(open(ann))["annotations"])
    result = run(None, str(tmp_path / "run"), iters=2, **{"train-ann": train_json, "train-images": images,
                                                          "val-ann": val_json, "val-images": images})
    assert result["model"].cfg.class_names == tuple(c["name"] for c in train["categories"])
    assert set(result["stats"]) >= {"AP", "per_class"}


def test_an_own_set_named_by_half_its_flags_or_of_other_val_classes_fails_before_training(tiny_shapes, tmp_path):
    ann, images = D.coco_paths(tiny_shapes, "train")
    with pytest.raises(ValueError, match="without --data your own set needs --val-ann, --val-images"):
        run(None, str(tmp_path / "a"), iters=2, **{"train-ann": ann, "train-images": images})
    other = tmp_path / "other.json"  # the val set's classes renamed: caught before the first iteration
    data = json.load(open(D.coco_paths(tiny_shapes, "val")[0]))
    other.write_text(json.dumps({**data, "categories": [{**c, "name": c["name"] + "x"} for c in data["categories"]]}))
    with pytest.raises(ValueError, match="other.json: the model's classes are not this dataset's"):
        run(None, str(tmp_path / "b"), iters=2, **{"train-ann": ann, "train-images": images, "val-ann": str(other),
                                                    "val-images": D.coco_paths(tiny_shapes, "val")[1]})
    assert not os.path.exists(tmp_path / "b" / "metrics.jsonl")

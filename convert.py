"""Your annotations into COCO, the format train.py, evaluation and analyze.py read: Pascal VOC XML (LabelImg,
CVAT's and Roboflow's VOC exports), YOLO txt labels and keras-retinanet's CSV; and COCO back out to each of them.

    python convert.py voc  mine/Annotations --images mine/JPEGImages --classes classes.txt --out mine/train.json
    python convert.py yolo mine/labels --images mine/images --classes classes.txt --out mine/train.json
    python convert.py csv  mine/annotations.csv --classes mine/classes.csv --out mine/train.json
    python convert.py voc  mine --out mine/train.json --val-fraction 0.1 --val-out mine/val.json
    python convert.py coco data/shapes/annotations/instances_val.json --images data/shapes/val --to voc --out mine
    python train.py --train-ann mine/train.json --train-images mine/JPEGImages --val-ann mine/val.json \\
        --val-images mine/JPEGImages --finetune torchvision --eval-at 2000 4000

The formats, as their tools write them:
- VOC: one XML a picture, <object><name> and <bndbox> xmin ymin xmax ymax, pixel indices from 1 (a box
  covering a W-px row has xmin 1, xmax W: x1 = xmin - 1, x2 = xmax, as detectron2 reads them). <difficult>
  objects are kept as boxes, as detectron2 trains on them. Without --classes the names found, sorted.
- YOLO: one txt a picture, `class cx cy w h` a line, the class a 0-based index into --classes (one name a
  line) and the box normalised to the picture; a picture without a txt has no objects.
- CSV (keras-retinanet): `path,x1,y1,x2,y2,class` a line in pixels, `path,,,,,` for a picture without
  objects, paths relative to the CSV's folder; --classes is its class mapping, `name,id` a line.
Category ids are 1..K in --classes' order; image ids 1..N in file order. Bad input stops the conversion with
one line naming the file, and its line where it has one: a box reaching more than 1 px outside its picture
(up to 1 px, the 0- or 1-based edge of annotation tools, it is clipped), x2 <= x1 or y2 <= y1, an unknown
class, a missing picture, a line that does not parse. Nothing is written until everything has been read.

Short readers of the standard library, not globox or supervision: globox reads VOC and YOLO but not
keras-retinanet's CSV and reports no line for a bad box; supervision would add PyAV, SciPy, requests and
YAML to the requirements for three formats of a few dozen lines each.
"""
import argparse
import csv
import io
import os
import re
import xml.etree.ElementTree as ET  # expat >= 2.4.1 refuses entity expansion bombs; no external entities
from xml.sax.saxutils import escape

from PIL import Image

import data as D


def picture_size(path, where):
    """(width, height) of the picture at path, read from its header; ValueError naming `where` if it is missing."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise ValueError(f"{where}: picture {path} cannot be read ({type(e).__name__})") from None


def checked_box(box, width, height, where):
    """The box (x1, y1, x2, y2) in pixels, clipped when it reaches at most 1 px outside the picture; ValueError
    naming `where` (file:line) for an empty box or one further outside."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: empty box, x2 <= x1 or y2 <= y1 ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
    if x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1:
        raise ValueError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside its {width}x{height} picture")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def read_names(path):
    """Class names, one a line (YOLO's names file), blank lines skipped."""
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def read_voc(folder, images=None, classes=None):
    """Pascal VOC XML files in folder, pictures in images (default: beside them, or VOC's JPEGImages next to
    Annotations). Returns (pictures [(file_name, width, height, [(box, name)])], names, images folder)."""
    xmls = sorted(f for f in os.listdir(folder) if f.endswith(".xml"))
    if not xmls:
        raise ValueError(f"{folder}: no .xml files")
    sibling = os.path.join(os.path.dirname(os.path.abspath(folder)), "JPEGImages")
    images = images or (sibling if os.path.basename(os.path.abspath(folder)) == "Annotations" else folder)
    names, pictures = (read_names(classes) if classes else None), []
    for name in xmls:
        path = os.path.join(folder, name)
        text = read_text(path)
        lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<object\b", text)]  # for the errors
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            raise ValueError(f"{path}: not valid XML ({e})") from None
        file_name = (root.findtext("filename") or "").strip() or os.path.splitext(name)[0] + ".jpg"
        width, height = picture_size(os.path.join(images, file_name), path)
        objects = []
        for line, obj in zip(lines, root.iter("object")):
            where, label = f"{path}:{line}", (obj.findtext("name") or "").strip()
            if names is not None and label not in names:
                raise ValueError(f"{where}: class {label!r} is not in {classes}")
            try:
                box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{where}: <object> without a numeric <bndbox> xmin ymin xmax ymax") from None
            objects.append((checked_box((box[0] - 1, box[1] - 1, box[2], box[3]), width, height, where), label))
        pictures.append((file_name, width, height, objects))
    return pictures, names or sorted({label for *_, objects in pictures for _, label in objects}), images


def read_yolo(folder, images, classes):
    """YOLO labels in folder (stem.txt for each picture in images). Returns read_voc's triple."""
    names, pictures = read_names(classes), []
    files = sorted(f for f in os.listdir(images) if f.lower().endswith(D.IMAGE_EXTENSIONS))
    stems = {os.path.splitext(f)[0] for f in files}
    skip = {"classes.txt", os.path.basename(classes)}  # LabelImg writes its class list beside the labels
    for txt in sorted(f for f in os.listdir(folder) if f.endswith(".txt") and f not in skip):
        if os.path.splitext(txt)[0] not in stems:
            raise ValueError(f"{os.path.join(folder, txt)}: no picture {os.path.splitext(txt)[0]}.* in {images}")
    for file_name in files:
        width, height = picture_size(os.path.join(images, file_name), os.path.join(images, file_name))
        path, objects = os.path.join(folder, os.path.splitext(file_name)[0] + ".txt"), []
        lines = read_text(path).splitlines() if os.path.exists(path) else []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where, fields = f"{path}:{number}", line.split()
            try:
                k, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
            except ValueError:
                raise ValueError(f"{where}: not 'class cx cy w h' ({line.strip()[:60]!r})") from None
            if not 0 <= k < len(names):
                raise ValueError(f"{where}: class {k} is not in {classes} ({len(names)} names, from 0)")
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
            objects.append((checked_box(box, width, height, where), names[k]))
        pictures.append((file_name, width, height, objects))
    return pictures, names, images


def read_csv(path, classes):
    """keras-retinanet's CSV and its class mapping (name,id). Returns read_voc's triple."""
    with open(classes, newline="", encoding="utf-8") as f:
        mapping, rows = {}, csv.reader(f)
        for row in rows:
            if len(row) != 2 or not row[1].strip().isdigit():
                raise ValueError(f"{classes}:{rows.line_num}: not 'class_name,id'")
            mapping[row[0]] = int(row[1])
    names, base, by_picture = sorted(mapping, key=mapping.get), os.path.dirname(os.path.abspath(path)), {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        for row in rows:
            where = f"{path}:{rows.line_num}"  # the line, also after a quoted field spanning lines
            if len(row) != 6:
                raise ValueError(f"{where}: not 'path,x1,y1,x2,y2,class' ({len(row)} fields)")
            if row[0] not in by_picture:
                by_picture[row[0]] = (*picture_size(os.path.join(base, row[0]), where), [])
            width, height, objects = by_picture[row[0]]
            if row[1:] == [""] * 5:  # a picture without objects
                continue
            if row[5] not in mapping:
                raise ValueError(f"{where}: class {row[5]!r} is not in {classes}")
            try:
                box = tuple(float(v) for v in row[1:5])
            except ValueError:
                raise ValueError(f"{where}: x1,y1,x2,y2 are not numbers ({','.join(row[1:5])})") from None
            objects.append((checked_box(box, width, height, where), row[5]))
    return [(p, *by_picture[p]) for p in sorted(by_picture)], names, base


def to_coco(pictures, names):
    """COCO instances (images, annotations, categories) of read_voc's pictures; category ids 1..K."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, (file_name, width, height, objects) in enumerate(pictures, 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[label],
                                "bbox": [round(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)],
                                "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": ids[n], "name": n, "supercategory": "object"} for n in names]}


def split(coco, fraction, seed=0):
    """(rest, held out): `fraction` of the pictures, drawn by seed, with their annotations."""
    n = round(len(coco["images"]) * fraction)
    if not 0 < n < len(coco["images"]):
        raise ValueError(f"--val-fraction {fraction} of {len(coco['images'])} pictures holds out {n}")
    return D.split_images(coco, n, seed)


def number(v):
    """A coordinate as text: up to 3 decimals, no trailing zeros (COCO's boxes have 2)."""
    return f"{round(v, 3):.12g}"


def csv_text(rows):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)  # quoted where a name or path has a comma
    return out.getvalue()


def write_from_coco(ann_file, images, to, out):
    """COCO -> VOC XML or YOLO txt (+ classes.txt, the categories in id order), or CSV (+ classes.csv) in out; crowd
    regions are left out (none of the three has them). The CSV keeps decimals (this reader takes them;
    keras-retinanet's own wants integers). Returns how many boxes were written."""
    coco, files, rows = D.load_coco(ann_file), {}, []
    cats = sorted(coco.cats)
    names, index = [coco.cats[c]["name"] for c in cats], {c: k for k, c in enumerate(cats)}  # YOLO's class index
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        w, h = info["width"], info["height"]
        boxes = [(a["bbox"], a["category_id"]) for a in coco.imgToAnns[image_id] if not a.get("iscrowd")]
        stem = os.path.splitext(info["file_name"])[0]
        if to == "voc":  # pixel indices from 1: xmin = x1 + 1, xmax = x2
            objects = "".join(f"<object><name>{escape(coco.cats[c]['name'])}</name><difficult>0</difficult><bndbox>"
                              f"<xmin>{number(x + 1)}</xmin><ymin>{number(y + 1)}</ymin><xmax>{number(x + bw)}</xmax>"
                              f"<ymax>{number(y + bh)}</ymax></bndbox></object>" for (x, y, bw, bh), c in boxes)
            files[f"{stem}.xml"] = (f"<annotation><filename>{escape(info['file_name'])}</filename><size>"
                                    f"<width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}"
                                    "</annotation>\n")
        elif to == "yolo":
            files[f"{stem}.txt"] = "".join(f"{index[c]} {(x + bw / 2) / w:.7f} {(y + bh / 2) / h:.7f} "
                                           f"{bw / w:.7f} {bh / h:.7f}\n" for (x, y, bw, bh), c in boxes)
        else:
            path = os.path.relpath(os.path.join(images, info["file_name"]), out)
            rows += [[path, *map(number, (x, y, x + bw, y + bh)), coco.cats[c]["name"]]
                     for (x, y, bw, bh), c in boxes] or [[path, "", "", "", "", ""]]
    if to in ("voc", "yolo"):  # VOC has no class list of its own: this one keeps the ids of every split the same
        files["classes.txt"] = "".join(f"{n}\n" for n in names)
    if to == "csv":
        files["annotations.csv"], files["classes.csv"] = csv_text(rows), csv_text((n, i) for i, n in enumerate(names))
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        D.write_atomic(os.path.join(out, name), lambda tmp, text=text: write_text(tmp, text))
    return sum(1 for a in coco.anns.values() if not a.get("iscrowd"))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("format", choices=["voc", "yolo", "csv", "coco"], help="what SOURCE is (coco: COCO out to --to)")
    a("source", help="voc: a folder of .xml; yolo: the folder of .txt labels; csv: the .csv; coco: the .json")
    a("--images", help="the pictures' folder (voc: default beside the XML or VOC's JPEGImages; yolo, coco: needed)")
    a("--classes", help="yolo: names file, one a line (needed); csv: the class mapping, name,id (needed); voc: "
      "names file, one a line (default: the names found, sorted; give it so that every split has the same ids)")
    a("--out", required=True, help="the COCO .json written (coco: the folder written)")
    a("--val-fraction", type=float, help="hold out this fraction of the pictures as a val set, into --val-out")
    a("--val-out", help="the held-out pictures' COCO .json (with --val-fraction)")
    a("--seed", type=int, default=0, help="draws the held-out pictures")
    a("--to", choices=["voc", "yolo", "csv"], help="coco: the format written")
    return p


def main(args):
    if args.format == "coco":
        if not (args.to and args.images):
            raise ValueError("convert.py coco needs --to and --images")
        n = write_from_coco(args.source, args.images, args.to, args.out)
        print(f"{n} boxes of {args.source} written as {args.to} to {args.out}")
        return args.out
    if args.format in ("yolo", "csv") and not args.classes or args.format == "yolo" and not args.images:
        raise ValueError(f"convert.py {args.format} needs --classes" + (" and --images" * (args.format == "yolo")))
    if bool(args.val_fraction) != bool(args.val_out):
        raise ValueError("--val-fraction and --val-out go together")
    if args.format == "voc":
        pictures, names, images = read_voc(args.source, args.images, args.classes)
    elif args.format == "yolo":
        pictures, names, images = read_yolo(args.source, args.images, args.classes)
    else:
        pictures, names, images = read_csv(args.source, args.classes)
    coco = to_coco(pictures, names)
    parts = split(coco, args.val_fraction, args.seed) if args.val_fraction else [coco]
    for part, path in zip(parts, (args.out, args.val_out)):
        D.write_json(path, part)
        print(f"{path}: {len(part['images'])} pictures, {len(part['annotations'])} boxes, {len(names)} classes")
    print(f"pictures in {images}: python train.py --train-ann {args.out} --train-images {images} ...")
    return coco


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None

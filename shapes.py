"""Synthetic detection sets in COCO format: the quick start's shapes set, written in seconds.

    python shapes.py                                   # the quick start's set: data/shapes (4,000 + 300 images)
    python shapes.py --out data/shapes_small --train 500 --size 128

The images hold what the paper is about (§1, §3): far more background than objects, many small
objects, and clutter that is not an object (hard negatives). The files are written in COCO's layout
(out/{train,val}/*.jpg, out/annotations/instances_{train,val}.json) and read back by data.py as any
COCO set is. Every file is written under a temporary name and renamed, the annotation file of a
split last: an interrupted run leaves no half-written file, and several processes writing the same
set into one folder (the nodes of a multi-node run on a shared filesystem) write identical files.
"""
import argparse
import io
import json
import math
import os
import socket

import numpy as np
from PIL import Image, ImageDraw

import data as D

SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def _draw_shape(draw, kind, box, color):
    x1, y1, x2, y2 = box
    if kind == "ellipse":
        draw.ellipse(box, fill=color)
    elif kind == "rectangle":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)
    else:  # cross: two bars a third of the box thick
        tw, th = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + tw, y1, x2 - tw, y2), fill=color)
        draw.rectangle((x1, y1 + th, x2, y2 - th), fill=color)


def _shapes_image(rng, size, max_objects):
    """One picture: a noisy gradient, clutter that is not an object, and 1..max_objects shapes."""
    base = rng.uniform(40, 215, 3)
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-40, 40, 3)
    pixels = base + ramp.transpose(1, 0, 2) * rng.uniform(0, 1) + ramp + rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 12)):  # clutter: thin strokes and specks, hard negatives
        color = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x, y = rng.uniform(0, size, 2)
        if rng.uniform() < 0.5:
            draw.line((x, y, x + rng.normal(0, size / 4), y + rng.normal(0, size / 4)), fill=color,
                      width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 2.5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    boxes, labels = [], []
    for _ in range(rng.integers(1, max_objects + 1) * 4):  # placement attempts
        if len(boxes) == max_objects:
            break
        side = math.exp(rng.uniform(math.log(0.08 * size), math.log(0.6 * size)))  # many small, some large
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
        if w > size - 2 or h > size - 2:
            continue
        x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (x1, y1, x1 + w, y1 + h)
        if any(min(box[2], b[2]) > max(box[0], b[0]) and min(box[3], b[3]) > max(box[1], b[1]) for b in boxes):
            continue  # no overlaps: every box is fully visible
        color = (base + rng.choice([-1, 1], 3) * rng.uniform(60, 110, 3)).clip(0, 255)  # contrast with background
        label = int(rng.integers(len(SHAPES)))
        _draw_shape(draw, SHAPES[label], box, tuple(int(c) for c in color))
        boxes.append(box)
        labels.append(label)
    return image, boxes, labels


def make_shapes(out, num_train=4000, num_val=300, size=160, max_objects=6, seed=0):
    """Write the shapes set in COCO format: out/{train,val}/*.jpg, out/annotations/instances_{train,val}.json."""
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, boxes, labels = _shapes_image(rng, size, max_objects)
            name = f"{i + 1:06d}.jpg"  # named by id, as COCO does
            jpeg = io.BytesIO()
            image.save(jpeg, "JPEG", quality=92)
            _save_atomic(os.path.join(out, split, name), jpeg.getvalue())
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), lab in zip(boxes, labels):
                bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": lab + 1,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        ann_file = D.coco_paths(out, split)[0]
        os.makedirs(os.path.dirname(ann_file), exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        _save_atomic(ann_file, json.dumps(coco).encode())  # the annotation file appears last, complete
    return out


def _save_atomic(path, content):
    """content (bytes) into path through a temporary name of this process's own, so that processes
    writing the same file at once never see or leave a torn one."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(content)
    os.replace(tmp, path)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    make_shapes(args.out, args.train, args.val, args.size, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val images to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

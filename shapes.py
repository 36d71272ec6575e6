"""The quick start's synthetic detection set in COCO format, written in seconds.

    python shapes.py                                   # the quick start's set: data/shapes (4,000 + 300 images)
    python shapes.py --out data/shapes_small --train 500 --size 128

The images hold what the paper is about (§1, §3): far more background than objects, many small
objects, and clutter that is not an object (hard negatives). The files are written in COCO's layout
(out/{train,val}/*.jpg, out/annotations/instances_{train,val}.json) and read back by data.py as any
COCO set is. Every file is written under a temporary name and renamed, the annotation file of a
split last: an interrupted run leaves no half-written file, and several processes writing the same
set into one folder (the nodes of a multi-node run on a shared filesystem) write identical files.
The Table 1 study's dense set is drawn with the same pieces (study/dense.py).
"""
import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw

import data as D

SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def draw_shape(draw, kind, box, color):
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


def background(rng, size, gray=False):
    """A noisy gradient with clutter that is not an object (thin strokes and specks): (image, draw, base
    colour). gray: a colour of little saturation, so that the dense set's class colours stand out."""
    base = rng.uniform(40, 215, 3) if not gray else rng.uniform(50, 200) + rng.uniform(-12, 12, 3)
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-40, 40, 3)
    pixels = base + ramp.transpose(1, 0, 2) * rng.uniform(0, 1) + ramp + rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 12)):
        color = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x, y = rng.uniform(0, size, 2)
        if rng.uniform() < 0.5:
            draw.line((x, y, x + rng.normal(0, size / 4), y + rng.normal(0, size / 4)), fill=color,
                      width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 2.5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return image, draw, base


def place(rng, size, taken, smallest, largest, aspects=(0.5, 2.0), whole=False):
    """A box of log-uniform side in [smallest, largest] and aspect w/h in `aspects` that overlaps no box
    of `taken`, or None. whole=True: integer corners (glyphs are pasted on the pixel grid)."""
    side = math.exp(rng.uniform(math.log(smallest), math.log(largest)))  # many small, some large
    aspect = math.exp(rng.uniform(math.log(aspects[0]), math.log(aspects[1])))
    w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
    if whole:
        w, h = max(2, round(w)), max(2, round(h))
    if w > size - 2 or h > size - 2:
        return None
    x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    if whole:
        x1, y1 = int(x1), int(y1)
    box = (x1, y1, x1 + w, y1 + h)
    if any(min(box[2], b[2]) > max(box[0], b[0]) and min(box[3], b[3]) > max(box[1], b[1]) for b in taken):
        return None  # no overlaps: every box is fully visible
    return box


def _contrast(rng, base):
    return tuple(int(c) for c in (base + rng.choice([-1, 1], 3) * rng.uniform(60, 110, 3)).clip(0, 255))


def _shapes_image(rng, size, max_objects):
    """One picture of the quick start's set: background, clutter, and 1..max_objects shapes."""
    image, draw, base = background(rng, size)
    boxes, labels = [], []
    for _ in range(rng.integers(1, max_objects + 1) * 4):  # placement attempts
        if len(boxes) == max_objects:
            break
        box = place(rng, size, boxes, 0.08 * size, 0.6 * size)
        if box is None:
            continue
        color = _contrast(rng, base)
        label = int(rng.integers(len(SHAPES)))
        draw_shape(draw, SHAPES[label], box, color)
        boxes.append(box)
        labels.append(label)
    return image, boxes, labels


def make_shapes(out, num_train=4000, num_val=300, size=160, max_objects=6, seed=0):
    """Write the quick start's shapes set in COCO format: out/{train,val}/*.jpg, out/annotations/."""
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    return write_set(out, {"train": num_train, "val": num_val}, categories, size,
                  lambda rng: _shapes_image(rng, size, max_objects), seed)


def write_set(out, splits, categories, size, make_image, seed):
    """Write {split: count} pictures of make_image(rng) -> (image, boxes, labels) and their COCO annotations."""
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, boxes, labels = make_image(rng)
            name = f"{i + 1:06d}.jpg"  # named by id, as COCO does
            D.write_atomic(os.path.join(out, split, name), lambda tmp, im=image: im.save(tmp, "JPEG", quality=92))
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), lab in zip(boxes, labels):
                bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": lab + 1,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        ann_file = D.coco_paths(out, split)[0]
        os.makedirs(os.path.dirname(ann_file), exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        D.write_json(ann_file, coco)  # the annotation file appears last, complete
    return out


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

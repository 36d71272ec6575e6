"""Synthetic detection sets in COCO format: the quick start's shapes set, written in seconds.

    python shapes.py                                   # the quick start's set: data/shapes (4,000 + 300 images)
    python shapes.py --out data/shapes_small --train 500 --size 128
    python shapes.py --preset dense                    # the Table 1 study's set: data/dense (4,000 + 500 images)
    python shapes.py --preset dense --classes 6 --out data/dense6   # the sweep's middle level

Each prints its imbalance as training counts it (shapes.imbalance).

The images hold what the paper is about (§1, §3): far more background than objects, many small
objects, and clutter that is not an object (hard negatives). The files are written in COCO's layout
(out/{train,val}/*.jpg, out/annotations/instances_{train,val}.json) and read back by data.py as any
COCO set is. Every file is written under a temporary name and renamed, the annotation file of a
split last: an interrupted run leaves no half-written file, and several processes writing the same
set into one folder (the nodes of a multi-node run on a shared filesystem) write identical files.
"""
import argparse
import functools
import math
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

import anchors as A
import data as D
from loss import assign_targets

SHAPES = ("ellipse", "rectangle", "triangle", "cross")
# The dense set's 30 classes: 6 forms in 5 colours ("red ellipse", ...), colour by colour
FORMS = ("ellipse", "rectangle", "triangle", "cross", "ring", "diamond")
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 80, 220), "yellow": (230, 205, 40),
          "magenta": (200, 50, 200)}
CLASSES = tuple(f"{c} {f}" for c in COLORS for f in FORMS)
# hard negatives, never labelled: the forms in other colours, glyphs and parts of forms in class colours
OTHER_COLORS = ((0, 195, 200), (245, 135, 20), (235, 235, 235), (125, 75, 35))  # cyan, orange, white, brown
GLYPHS = "ABEHKMNRSTXZ2345"
FONT = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")


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


def _background(rng, size, gray=False):
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


def _place(rng, size, taken, smallest, largest, aspects=(0.5, 2.0), whole=False):
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
    image, draw, base = _background(rng, size)
    boxes, labels = [], []
    for _ in range(rng.integers(1, max_objects + 1) * 4):  # placement attempts
        if len(boxes) == max_objects:
            break
        box = _place(rng, size, boxes, 0.08 * size, 0.6 * size)
        if box is None:
            continue
        color = _contrast(rng, base)
        label = int(rng.integers(len(SHAPES)))
        _draw_shape(draw, SHAPES[label], box, color)
        boxes.append(box)
        labels.append(label)
    return image, boxes, labels


@functools.cache
def _glyph(char):
    """The ink of one character of DejaVu Sans Bold (matplotlib's font), cropped to its bounding box: (h, w) uint8."""
    canvas = Image.new("L", (160, 160))
    ImageDraw.Draw(canvas).text((20, 10), char, fill=255, font=ImageFont.truetype(FONT, 120))
    return np.asarray(canvas.crop(canvas.getbbox()))


def _paste(image, ink, box, color):
    """ink (h, w) stretched onto the integer box, in color, anti-aliased."""
    x1, y1, x2, y2 = box
    mask = Image.fromarray(ink).resize((x2 - x1, y2 - y1), Image.BILINEAR)
    image.paste(color, (x1, y1, x2, y2), mask)


@functools.cache
def _form(kind):
    """One of FORMS as an ink mask (h, w) uint8, 120 px, drawn like the quick start's shapes."""
    canvas = Image.new("L", (120, 120))
    draw, box = ImageDraw.Draw(canvas), (0, 0, 119, 119)
    if kind == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((28, 28, 91, 91), fill=0)
    elif kind == "diamond":
        draw.polygon([(60, 0), (119, 60), (60, 119), (0, 60)], fill=255)
    else:
        _draw_shape(draw, kind, box, 255)
    return np.asarray(canvas)


def _tint(rng, color):
    return tuple(int(c) for c in np.clip(np.array(color) * rng.uniform(0.85, 1.1) + rng.uniform(-20, 20, 3), 0, 255))


def _dense_image(rng, size, num_classes):
    """One picture of the dense set: a gray background with clutter, 3-8 hard negatives (the forms in
    colours that are no class, glyphs and halves of forms in class colours), then 1-2 objects of the
    first num_classes classes, most of them small."""
    image, draw, _ = _background(rng, size, gray=True)
    colors = list(COLORS.values())
    boxes, labels, taken = [], [], []
    for _ in range(int(rng.integers(3, 9)) * 3):  # hard negatives: object-like, never labelled
        if len(taken) == 8 or (box := _place(rng, size, taken, 10, 0.35 * size, (0.6, 1.6), whole=True)) is None:
            continue
        kind, color = rng.uniform(), colors[rng.integers(len(colors))]
        if kind < 0.4:  # a form in a colour that is no class
            ink, color = _form(FORMS[rng.integers(len(FORMS))]), OTHER_COLORS[rng.integers(len(OTHER_COLORS))]
        elif kind < 0.7:
            ink = _glyph(GLYPHS[rng.integers(len(GLYPHS))])
        else:  # half of a form whose halves are no class: an arc of the ring, a semi-ellipse, a T of the cross
            ink, axis = _form(("ellipse", "cross", "ring")[rng.integers(3)]), int(rng.integers(2))
            keep = slice(None, 60) if rng.uniform() < 0.5 else slice(60, None)
            ink = ink[keep] if axis == 0 else ink[:, keep]
        _paste(image, np.ascontiguousarray(ink), box, _tint(rng, color))
        taken.append(box)
    wanted = int(rng.integers(1, 3))
    for _ in range(wanted * 6):
        if len(boxes) == wanted or (box := _place(rng, size, taken, 12, 0.35 * size, (0.6, 1.6), whole=True)) is None:
            continue
        label = int(rng.integers(num_classes))
        _paste(image, _form(FORMS[label % len(FORMS)]), box, _tint(rng, colors[label // len(FORMS)]))
        boxes.append(box)
        labels.append(label)
        taken.append(box)
    return image, boxes, labels


def make_shapes(out, num_train=4000, num_val=300, size=160, max_objects=6, seed=0):
    """Write the quick start's shapes set in COCO format: out/{train,val}/*.jpg, out/annotations/."""
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    return _write(out, {"train": num_train, "val": num_val}, categories, size,
                  lambda rng: _shapes_image(rng, size, max_objects), seed)


def make_dense(out, num_train=4000, num_val=500, size=192, num_classes=30, seed=0):
    """Write the dense set: the first num_classes of CLASSES (up to 30) among look-alikes, COCO format;
    print its imbalance (what the set is for)."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"the dense set has 1 to {len(CLASSES)} classes, not {num_classes}")
    categories = [{"id": i + 1, "name": CLASSES[i], "supercategory": "coloured shape"} for i in range(num_classes)]
    _write(out, {"train": num_train, "val": num_val}, categories, size,
           lambda rng: _dense_image(rng, size, num_classes), seed)
    print(f"{out}: {describe(imbalance(training_view(out, size)))}")
    return out


def training_view(out, size):
    """The train split of a written set as training sees it at `size` (unflipped)."""
    return D.CocoDetection(*D.coco_paths(out, "train"), train=True, min_size=size, max_size=size, flip=0.0)


def describe(counts):
    return (f"{counts['objects_per_image']:.2f} objects, {counts['anchors_per_image']:,.0f} anchors and "
            f"{counts['positive_anchors_per_image']:.1f} positive anchors an image; "
            f"{counts['negative_anchors_per_positive']:,.0f} negative anchors per positive (COCO ~790) and "
            f"{counts['negative_samples_per_positive']:,.0f} negative samples per positive (COCO ~63,000), "
            f"over {counts['images']} training images")


def _write(out, splits, categories, size, make_image, seed):
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


def imbalance(ds, anchor_sizes=(16, 32, 64, 128, 256), size_divisible=32, max_images=200):
    """What focal loss is about, counted over the first max_images of a dataset as training assigns
    anchors (loss.assign_targets, anchors 9 a location on P3-P7): objects, anchors and positive
    anchors an image, negative anchors per positive anchor, and negative (anchor, class) samples per
    positive sample (with K classes, every kept anchor is K samples; COCO at 800 px: ~790 and ~63,000)."""
    counts = dict.fromkeys(("images", "objects", "anchors", "pos", "neg", "neg_samples"), 0)
    K = len(ds.cat_ids)
    for i in range(min(len(ds), max_images)):
        image, target = ds[i]
        padded = [-(-s // size_divisible) * size_divisible for s in image.shape[1:]]
        anchors = A.generate_anchors(padded, anchor_sizes)
        matched, _, onehot, keep = assign_targets(anchors, [target["boxes"]], [target["labels"]], K)
        pos = int((matched >= 0).sum())
        counts["images"] += 1
        counts["objects"] += len(target["boxes"])
        counts["anchors"] += len(anchors)
        counts["pos"] += pos
        counts["neg"] += int(keep.sum()) - pos
        counts["neg_samples"] += int(keep.sum()) * K - int(onehot.sum())
    n, pos = counts["images"], max(counts["pos"], 1)
    return {"images": n, "classes": K, "objects_per_image": counts["objects"] / n,
            "anchors_per_image": counts["anchors"] / n,
            "positive_anchors_per_image": counts["pos"] / n, "negative_anchors_per_positive": counts["neg"] / pos,
            "negative_samples_per_positive": counts["neg_samples"] / pos}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["shapes", "dense"], default="shapes",
                   help="the quick start's set, or the Table 1 study's dense set (COCO's imbalance)")
    p.add_argument("--out", help="default data/shapes, or data/dense")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, help="default 300, dense 500")
    p.add_argument("--size", type=int, help="default 160, dense 192")
    p.add_argument("--classes", type=int, default=30, help="dense: how many of its 30 classes")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    dense = args.preset == "dense"
    out, size = args.out or f"data/{args.preset}", args.size or (192 if dense else 160)
    val = args.val or (500 if dense else 300)
    if dense:
        make_dense(out, args.train, val, size, args.classes, seed=args.seed)  # prints its imbalance
    else:
        make_shapes(out, args.train, val, size, seed=args.seed)
        print(f"{out}: {describe(imbalance(training_view(out, size)))}")
    print(f"wrote {args.train} train and {val} val images to {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

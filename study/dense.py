"""The Table 1 study's dense set and its training recipe: COCO's imbalance in small pictures (§1, §3, §5.1).

    python -m study.dense                                  # data/dense: 4,000 + 500 pictures of 192 px
    python -m study.dense --classes 6 --out data/dense6    # the imbalance sweep's middle level
    python -m study.dense --count data/shapes --size 160   # the imbalance of any written set (the quick start's)

With one sigmoid per class, each of ~100k anchors an image is K samples: on COCO at 800 px, ~790 negative
anchors and ~63,000 negative (anchor, class) samples per positive (`imbalance` counts them as training
assigns anchors). The quick start's shapes set has 149 and 600. The dense set has COCO's: 192-px pictures
with 1-2 small objects of 30 classes (6 forms x 5 colours) among up to 8 look-alikes (forms in colours that
are no class, letters, halves of forms) and clutter. It is drawn with shapes.py's pieces and written in
COCO's layout, as the shapes set is.

DENSE is the study's recipe (the paper's fine-tuning recipe in small); the study's runs name it `--preset
dense` in their flags (and in the committed ledger), and `train_flags` spells it out for train.py, which
knows only the paper's and the quick start's presets.
"""
import argparse
import functools
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

import anchors as A
import data as D
import shapes
from loss import assign_targets

# The dense set's 30 classes: 6 forms in 5 colours ("red ellipse", ...), colour by colour
FORMS = ("ellipse", "rectangle", "triangle", "cross", "ring", "diamond")
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 80, 220), "yellow": (230, 205, 40),
          "magenta": (200, 50, 200)}
CLASSES = tuple(f"{c} {f}" for c in COLORS for f in FORMS)
# hard negatives, never labelled: the forms in other colours, glyphs and parts of forms in class colours
OTHER_COLORS = ((0, 195, 200), (245, 135, 20), (235, 235, 235), (125, 75, 35))  # cyan, orange, white, brown
GLYPHS = "ABEHKMNRSTXZ2345"
FONT = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")

# The dense set's recipe: as the paper fine-tunes an ImageNet ResNet with frozen BN, a ResNet-18 pretrained on the
# set's crops (study/pretrain.py); 64-channel FPN and GroupNorm heads, 192-px pictures, batch 8, 800 iterations.
# Spelled out, not derived from train.QUICKSTART: a faster quick start must not change the Table 1 study.
BACKBONE = "runs/pretrain/resnet18_dense.pth"  # written by study/pretrain.py
DENSE = dict(arch="resnet18", norm="frozen", freeze_at=2, backbone_weights=BACKBONE, channels=64,
             head_norm="gn", anchor_sizes=[16, 32, 64, 128, 256], min_size=192, max_size=192, batch_size=8, lr=0.04,
             iters=800, steps=[600, 720], warmup_iters=100, ckpt_every=200, workers=1, train_split="train",
             val_split="val", out="runs/dense", size_divisible=32, amp="off")  # float32, as every study run was


def train_flags(flags):
    """train.py's flags for a study run's `flags`: `--preset dense` replaced by DENSE's values, before the other
    flags, which override them (argparse keeps a flag's last value). Other flags pass through unchanged.
    (train.py then names its preset after --data, "paper", whose every value DENSE's replace.)"""
    flags = list(flags)
    if "--preset" not in flags or flags[flags.index("--preset") + 1:][:1] != ["dense"]:
        return flags
    if not os.path.exists(DENSE["backbone_weights"]) and "--backbone-weights" not in flags:
        raise FileNotFoundError(f"{DENSE['backbone_weights']}: no pretrained backbone yet; `python -m study.pretrain` "
                                "makes it")
    i, recipe = flags.index("--preset"), []
    for key, value in DENSE.items():
        recipe += ["--" + key.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    return recipe + flags[:i] + flags[i + 2:]


def make_dense(out, num_train=4000, num_val=500, size=192, num_classes=30, seed=0):
    """Write the dense set: the first num_classes of CLASSES (up to 30) among look-alikes, COCO format;
    print its imbalance (what the set is for)."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"the dense set has 1 to {len(CLASSES)} classes, not {num_classes}")
    categories = [{"id": i + 1, "name": CLASSES[i], "supercategory": "coloured shape"} for i in range(num_classes)]
    shapes.write_set(out, {"train": num_train, "val": num_val}, categories, size,
                     lambda rng: _dense_image(rng, size, num_classes), seed)
    print(f"{out}: {describe(imbalance(training_view(out, size)))}")
    return out


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
        shapes.draw_shape(draw, kind, box, 255)
    return np.asarray(canvas)


def _tint(rng, color):
    return tuple(int(c) for c in np.clip(np.array(color) * rng.uniform(0.85, 1.1) + rng.uniform(-20, 20, 3), 0, 255))


def _dense_image(rng, size, num_classes):
    """One picture of the dense set: a gray background with clutter, 3-8 hard negatives (the forms in
    colours that are no class, glyphs and halves of forms in class colours), then 1-2 objects of the
    first num_classes classes, most of them small."""
    image, draw, _ = shapes.background(rng, size, gray=True)
    colors = list(COLORS.values())
    boxes, labels, taken = [], [], []
    for _ in range(int(rng.integers(3, 9)) * 3):  # hard negatives: object-like, never labelled
        box = None if len(taken) == 8 else shapes.place(rng, size, taken, 10, 0.35 * size, (0.6, 1.6), whole=True)
        if box is None:
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
        box = None if len(boxes) == wanted else shapes.place(rng, size, taken, 12, 0.35 * size, (0.6, 1.6), whole=True)
        if box is None:
            continue
        label = int(rng.integers(num_classes))
        _paste(image, _form(FORMS[label % len(FORMS)]), box, _tint(rng, colors[label // len(FORMS)]))
        boxes.append(box)
        labels.append(label)
        taken.append(box)
    return image, boxes, labels


def training_view(out, size):
    """The train split of a written set as training sees it at `size` (unflipped)."""
    return D.CocoDetection(*D.coco_paths(out, "train"), train=True, min_size=size, max_size=size, flip=0.0)


def describe(counts):
    return (f"{counts['objects_per_image']:.2f} objects, {counts['anchors_per_image']:,.0f} anchors and "
            f"{counts['positive_anchors_per_image']:.1f} positive anchors an image; "
            f"{counts['negative_anchors_per_positive']:,.0f} negative anchors per positive (COCO ~790) and "
            f"{counts['negative_samples_per_positive']:,.0f} negative samples per positive (COCO ~63,000), "
            f"over {counts['images']} training images")


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
    p.add_argument("--out", default="data/dense")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--classes", type=int, default=30, help="how many of its 30 classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", metavar="SET", help="write nothing: print the imbalance of this written set at --size")
    return p


def main(args):
    if args.count:
        print(f"{args.count}: {describe(imbalance(training_view(args.count, args.size)))}")
        return
    make_dense(args.out, args.train, args.val, args.size, args.classes, seed=args.seed)  # prints its imbalance
    print(f"wrote {args.train} train and {args.val} val images to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

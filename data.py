"""Data: COCO-format detection datasets through pycocotools, a synthetic shapes set, COCO evaluation.

The paper trains on COCO trainval35k and reports COCO AP on minival / test-dev (§5). Any dataset in
COCO format works: an instances_*.json and a folder of images. The synthetic "shapes" set is
written in the same format, so the quick start exercises exactly the code COCO uses.

    python data.py shapes --out data/shapes          # writes the shapes set (seconds)

This file knows no model: it yields uint8 images and per-image targets, and scores COCO results.
"""
import argparse
import contextlib
import io
import json
import math
import os
import warnings

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_paths(root, split):
    """The standard layout: root/annotations/instances_{split}.json and root/{split}/."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def load_coco(ann_file):
    """A pycocotools COCO index of ann_file, or a one-line ValueError naming the file."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{ann_file}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{ann_file}: not COCO instances format (no {', '.join(missing)})")
    if not data["images"]:
        raise ValueError(f"{ann_file}: the dataset has no images")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images (uint8, (3, H, W)) and targets {"boxes" (M, 4) xyxy, "labels" (M,), "image_id", "orig_size"}.

    Category ids become contiguous labels 0..K-1 (cat_ids maps back). Crowd boxes are left out of
    the targets (COCOeval ignores detections on them); boxes reaching outside the image are clipped
    and boxes under 1 px wide or high are dropped, both counted in one warning. Images with no
    boxes stay: they train as pure background. train=True resizes (one shorter side, or a random
    one of `scales` as detectron2's multi-scale) and flips; train=False returns images as stored.
    """

    def __init__(self, ann_file, img_dir, train=False, min_size=800, max_size=1333, scales=None, flip=0.5, seed=0):
        self.coco, self.ann_file, self.img_dir, self.seed = load_coco(ann_file), ann_file, img_dir, seed
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.class_names = tuple(self.coco.cats[c]["name"] for c in self.cat_ids)
        label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.targets, dropped, clipped = [], 0, 0
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            boxes, labels = [], []
            for ann in self.coco.imgToAnns[img_id]:
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = ann["bbox"]
                box = [max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"])]
                clipped += box != [x, y, x + w, y + h]
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    dropped += 1
                    continue
                boxes.append(box)
                labels.append(label_of[ann["category_id"]])
            self.targets.append((torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels)))
        if dropped or clipped:
            warnings.warn(f"{ann_file}: {clipped} boxes clipped to their image, {dropped} under 1 px dropped",
                          stacklevel=2)
        self.transform = None
        if train:
            cap = max_size if max_size > min_size else None  # torchvision's Resize wants max_size > size
            resize = T.RandomShortestSize(scales, max_size) if scales else T.Resize(min_size, max_size=cap)
            self.transform = T.Compose([resize, T.RandomHorizontalFlip(flip)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        """key: an index, or (index, sample_seed): the seed fixes that sample's augmentation, so a
        run gives the same batches with any number of workers, ranks, or after --resume."""
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self)):  # an unreadable image is skipped, never fatal mid-epoch
            i = (index + attempt) % len(self)
            info = self.coco.imgs[self.ids[i]]
            path = os.path.join(self.img_dir, info["file_name"])
            try:
                with Image.open(path) as im:
                    image = T.functional.pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
                break
            except OSError as e:  # missing, not an image, truncated
                warnings.warn(f"{path}: skipped, cannot read the image ({e})", stacklevel=2)
        else:
            raise RuntimeError(f"{self.img_dir}: no readable image")
        boxes, labels = self.targets[i]
        h, w = image.shape[-2:]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)), "labels": labels}
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                if sample_seed is not None:
                    torch.manual_seed(self.seed * 1_000_003 + sample_seed)
                image, target = self.transform(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
            "image_id": self.ids[i], "orig_size": (h, w),
        }


def collate(batch, size_divisible=128, fill=(0, 0, 0)):
    """Pad a list of (image, target) to one uint8 batch (N, 3, H, W), H and W multiples of
    size_divisible, filled with `fill` (the mean colour, which normalises to ~0). Targets stay a list."""
    images, targets = zip(*batch)
    H = math.ceil(max(im.shape[1] for im in images) / size_divisible) * size_divisible
    W = math.ceil(max(im.shape[2] for im in images) / size_divisible) * size_divisible
    out = torch.tensor(fill, dtype=torch.uint8)[None, :, None, None].repeat(len(images), 1, H, W)
    for o, im in zip(out, images):
        o[:, : im.shape[1], : im.shape[2]] = im
    return out, list(targets)


class BatchStream(torch.utils.data.Sampler):
    """Batches of one endless shuffled stream (a new permutation each epoch). Global batch i is
    positions [i*B, (i+1)*B); rank r takes its slice. Each sample carries its position, which seeds
    its augmentation: N ranks see exactly the batches of one process, and --resume picks up mid-epoch."""

    def __init__(self, n, batch_size, seed, start_iter, iters, rank=0, world=1):
        self.n, self.B, self.seed, self.start, self.iters = n, batch_size, seed, start_iter, iters
        self.rank, self.world, self.perms = rank, world, {}

    def index(self, pos):
        epoch, j = divmod(pos, self.n)
        if epoch not in self.perms:
            self.perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self.perms[epoch][j].item()

    def __iter__(self):
        b = self.B // self.world
        for it in range(self.start, self.iters):
            first = it * self.B + self.rank * b
            yield [(self.index(p), p) for p in range(first, first + b)]

    def __len__(self):
        return self.iters - self.start


def coco_results(detections, image_ids, cat_ids):
    """Detections ({"boxes" xyxy, "scores", "labels"} per image) -> COCO results (xywh, category ids)."""
    results = []
    for det, img_id in zip(detections, image_ids):
        boxes = det["boxes"].tolist()
        for (x1, y1, x2, y2), s, lab in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(img_id), "category_id": int(cat_ids[lab]),
                            "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(s, 5)})
    return results


def coco_evaluate(coco_gt, results, image_ids=None):
    """COCOeval (bbox) of COCO results against coco_gt: the 12 summary numbers as a dict."""
    if not results:
        return dict.fromkeys(STATS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    ev.summarize()
    return {k: float(v) for k, v in zip(STATS, ev.stats)}


# ---- the synthetic shapes set ----------------------------------------------------------------------------------

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
            image.save(os.path.join(out, split, name), quality=92)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), lab in zip(boxes, labels):
                bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": lab + 1,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        ann_file = coco_paths(out, split)[0]
        os.makedirs(os.path.dirname(ann_file), exist_ok=True)
        with open(ann_file + ".tmp", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        os.replace(ann_file + ".tmp", ann_file)  # the annotation file appears last, complete
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="write the synthetic shapes set")
    s.add_argument("--out", default="data/shapes")
    s.add_argument("--train", type=int, default=4000)
    s.add_argument("--val", type=int, default=300)
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    make_shapes(args.out, args.train, args.val, args.size, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val images to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

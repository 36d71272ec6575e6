"""Data: COCO-format detection datasets through pycocotools, batched for training.

The paper trains on COCO trainval35k and reports COCO AP on minival / test-dev (§5). Any dataset in
COCO format works: an instances_*.json and a folder of images; shapes.py writes a synthetic set in
that format, so the quick start exercises exactly the code COCO uses, and convert.py turns Pascal VOC,
YOLO and CSV annotations into it.

This file knows no model: it yields uint8 images and per-image targets and batches them (BatchStream,
collate); evaluate.py scores the detections.
"""
import contextlib
import io
import json
import math
import os
import socket
import warnings

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # the pictures of a folder


def write_atomic(path, write):
    """write(tmp) to a temporary name of this process's own, then rename it to path: a crash never
    leaves a half-written file, and processes writing the same file at once never tear it."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{socket.gethostname()}-{os.getpid()}.tmp{ext}"  # the extension stays: savefig, np.savez
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)

    write_atomic(path, dump)


def save_figure(fig, out, name, numbers):
    """out/name.png and the numbers behind it, out/name.json, each written atomically (the analyses' outputs)."""
    os.makedirs(out, exist_ok=True)
    fig.tight_layout()
    write_atomic(os.path.join(out, f"{name}.png"), lambda tmp: fig.savefig(tmp, dpi=100))
    write_json(os.path.join(out, f"{name}.json"), numbers)


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
    cats, images = {c["id"] for c in data["categories"]}, {im["id"] for im in data["images"]}
    for ann in data["annotations"]:  # before any target is built: one line, not a KeyError deep in training
        if ann.get("category_id") not in cats:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} has category_id {ann.get('category_id')}, "
                             f"which is not among its {len(cats)} categories")
        if ann.get("image_id") not in images:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} has image_id {ann.get('image_id')}, "
                             f"which is not among its {len(images)} images")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def holdout_split(root, split="train", holdout=500, seed=0):
    """A held-out split of a set's training pictures, to choose by (a learning rate, a schedule's end)
    without looking at the val pictures a table reports: root/annotations/instances_{split}_fit.json and
    ..._holdout.json, `holdout` images drawn by `seed` and the rest, with their annotations; the images
    stay in root/{split}/. Written once (atomically), again if the source is newer; returns (fit, holdout)."""
    ann, _ = coco_paths(root, split)
    paths = [coco_paths(root, f"{split}_{part}")[0] for part in ("fit", "holdout")]
    if all(os.path.exists(p) and os.path.getmtime(p) >= os.path.getmtime(ann) for p in paths):
        return tuple(paths)  # (a set written again is split again)
    with open(ann) as f:
        data = json.load(f)
    if not 0 < holdout < len(data["images"]):
        raise ValueError(f"{ann}: cannot hold out {holdout} of its {len(data['images'])} images")
    for path, part in zip(paths, split_images(data, holdout, seed)):
        write_json(path, part)
    return tuple(paths)


def split_images(data, n, seed=0):
    """COCO instances (a dict) cut in two, (the rest, n images drawn by seed), each with its annotations."""
    order = torch.randperm(len(data["images"]), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {data["images"][i]["id"] for i in order[:n]}
    return [{**data, "images": [im for im in data["images"] if keep(im["id"])],
             "annotations": [a for a in data["annotations"] if keep(a["image_id"])]}
            for keep in (lambda i: i not in held, lambda i: i in held)]


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

    def aspect_groups(self):
        """0 for each landscape or square image, 1 for each portrait one (from the annotations, no decoding)."""
        return [int(self.coco.imgs[i]["height"] > self.coco.imgs[i]["width"]) for i in self.ids]

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


def collate(batch, size_divisible=32, fill=(0, 0, 0)):
    """Pad a list of (image, target) to one uint8 batch (N, 3, H, W), H and W multiples of
    size_divisible, filled with `fill` (the mean colour, which normalises to ~0). Targets stay a
    list; each gets "size", its image's (h, w) in the batch."""
    images, targets = zip(*batch)
    H = math.ceil(max(im.shape[1] for im in images) / size_divisible) * size_divisible
    W = math.ceil(max(im.shape[2] for im in images) / size_divisible) * size_divisible
    out = torch.tensor(fill, dtype=torch.uint8)[None, :, None, None].repeat(len(images), 1, H, W)
    for o, im in zip(out, images):
        o[:, : im.shape[1], : im.shape[2]] = im
    return out, [{**t, "size": tuple(im.shape[1:])} for t, im in zip(targets, images)]


class BatchStream(torch.utils.data.Sampler):
    """Batches of one endless shuffled stream (a new permutation each epoch), rank r taking its
    slice of each global batch. Each sample carries its stream position, which seeds its
    augmentation, so N ranks see exactly the batches of one process, with any number of workers,
    and --resume picks up mid-epoch.

    groups (one id a sample, e.g. landscape 0 / portrait 1) makes each global batch one group's,
    as detectron2's and torchvision's aspect-ratio grouping do: the stream fills one buffer per
    group, and a full buffer is the next batch. Pairing a landscape image with a portrait one pads
    both to a square; on COCO photos at 800 px that was a quarter of every batch."""

    def __init__(self, n, batch_size, seed, start_iter, iters, rank=0, world=1, groups=None):
        self.n, self.B, self.seed, self.start, self.iters = n, batch_size, seed, start_iter, iters
        self.rank, self.world, self.groups = rank, world, groups

    def global_batches(self):
        """Every global batch from iteration 0 on: lists of (sample index, stream position)."""
        buffers, pos = {}, 0
        while True:
            epoch = pos // self.n
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for j, index in enumerate(perm):
                buffer = buffers.setdefault(0 if self.groups is None else self.groups[index], [])
                buffer.append((index, epoch * self.n + j))
                if len(buffer) == self.B:
                    yield buffer.copy()
                    buffer.clear()
            pos += self.n

    def __iter__(self):
        b = self.B // self.world
        for it, batch in zip(range(self.iters), self.global_batches()):  # a resume replays the stream's
            if it >= self.start:  # integers up to start (about a second for 90k iterations), no images
                yield batch[self.rank * b:(self.rank + 1) * b]

    def __len__(self):
        return self.iters - self.start

"""Detect objects in your own pictures with a trained RetinaNet (§4 "Inference").

    python infer.py photo.jpg                                  # the quick start's checkpoint (python train.py)
    python infer.py photos/ more.png --out runs/infer --json detections.json
    python infer.py street.jpg --weights torchvision           # torchvision's COCO RetinaNet (downloads once)
    python infer.py street.jpg --weights runs/retinanet/checkpoint.pt --score-thresh 0.3 --device cuda
    python infer.py photo.jpg --weights runs/export/retinanet.onnx     # export.py's file, run by ONNX Runtime
    python infer.py photo.jpg --amp off                        # float32 where bfloat16 would be used

Writes each image with its boxes, class names and scores drawn into --out, prints a table per image,
and with --json writes every detection in COCO results format. Everything the model needs (config,
class names, test scale) comes from the checkpoint. A file that cannot be read is reported in one
line and skipped; the exit status is 1 when any failed. On a CPU that computes bfloat16 natively (AMX,
AVX512-BF16) the network runs under bfloat16 autocast (2.7x faster for ResNet-50 on an AMX host), its
outputs decoded in float32; the shapes val set's AP moves by under 0.005 (README).
"""
import argparse
import math
import os
import sys
import time

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.utils import draw_bounding_boxes

import data as D
import model as M
import weights as W
from evaluate import coco_results

DEFAULT_WEIGHTS = "runs/quickstart/checkpoint.pt"
FONT = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324"]


def load_model(weights=DEFAULT_WEIGHTS, device="cpu"):
    """A checkpoint of this project, or 'torchvision' / 'torchvision-v2' (COCO weights, downloaded once)."""
    if weights == DEFAULT_WEIGHTS and not os.path.exists(weights):
        raise FileNotFoundError(f"{weights}: no checkpoint yet; make one with `python train.py` (5-10 minutes "
                                f"on a CPU), or pass --weights PATH or --weights torchvision")
    return W.load_checkpoint(weights, device).for_inference()


def load_image(path, limit=None):
    """An image file as a (3, H, W) uint8 tensor, as people have them: EXIF orientation applied,
    alpha composited on white, grayscale/CMYK/palette to RGB, 16-bit scaled to 8. Photos with a side
    over 2 * limit are decoded reduced (JPEG draft mode, fast). Returns (image, scale to the file's pixels)."""
    with Image.open(path) as im:
        width = im.size[1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size[0]  # after rotation
        if limit and max(im.size) > 2 * limit:  # JPEG: decode at 1/2, 1/4 or 1/8 of the size, no smaller
            im.draft("RGB", tuple(s * 2 * limit // max(im.size) for s in im.size))
        im = ImageOps.exif_transpose(im)
        if limit and max(im.size) > 2 * limit:
            im = im.reduce(math.ceil(max(im.size) / (2 * limit)))
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im.convert("RGBA"))
        image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    return image, width / image.shape[2]


def list_images(paths):
    """Files as given, and the image files of folders (sorted); a missing path is kept to be reported."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(D.IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def draw(image, det, class_names):
    if not len(det["boxes"]):
        return image
    labels = [f"{class_names[lab] if lab < len(class_names) else lab} {s:.2f}"
              for lab, s in zip(det["labels"].tolist(), det["scores"].tolist())]
    colors = [PALETTE[lab % len(PALETTE)] for lab in det["labels"].tolist()]
    side = max(image.shape[1:])
    return draw_bounding_boxes(image, det["boxes"], labels=labels, colors=colors, width=max(1, round(side / 300)),
                               font=FONT, font_size=max(9, round(side / 45)), fill_labels=True, label_colors="white",
                               label_background_colors=colors)


def save_image(tensor, path):
    D.write_atomic(path, lambda tmp: Image.fromarray(tensor.permute(1, 2, 0).numpy()).save(tmp, quality=92))


def image_id(path, index):
    """COCO names files by id (000000000139.jpg): keep that id, so results score against COCO annotations."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else index + 1


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="images, or folders of images")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="checkpoint, .onnx file (export.py), 'torchvision' or 'torchvision-v2'")
    p.add_argument("--out", default="runs/infer", help="folder for the annotated images")
    p.add_argument("--json", help="write all detections to this file in COCO results format")
    p.add_argument("--score-thresh", type=float, default=0.5, help="show detections above this score")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="autocast: bfloat16 on a CPU, float16 on CUDA (auto: on CPUs with AMX or AVX512-BF16)")
    p.add_argument("--batch-size", type=int, default=4, help="images of any sizes per forward pass")
    p.add_argument("--min-size", type=int, help="override the checkpoint's test scale (shorter side)")
    p.add_argument("--max-size", type=int, help="override the checkpoint's longest side")
    return p


def main(args):
    """Returns (detections by path, number of failed files)."""
    model = load_model(args.weights, args.device)
    cfg = model.cfg
    cfg.min_size, cfg.max_size = args.min_size or cfg.min_size, args.max_size or cfg.max_size
    amp, why = M.autocast_choice(args.amp, M.model_device(model))
    if not isinstance(model, W.OnnxRetinaNet):  # ONNX Runtime runs the exported file's float32
        print(why)
    os.makedirs(args.out, exist_ok=True)
    paths, failed, results, by_path, used = list_images(args.paths), 0, [], {}, set()
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path in paths[start:start + args.batch_size]:
            try:
                batch.append((path, *load_image(path, limit=max(cfg.max_size, 800))))
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, not an image, truncated
                print(f"error: {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
                failed += 1
        if not batch:
            continue
        t0 = time.time()
        detections = M.detect(model, [image for _, image, _ in batch], args.score_thresh, amp=amp is not None)
        seconds = (time.time() - t0) / len(batch)
        for (path, image, scale), det in zip(batch, detections):
            stem = os.path.splitext(os.path.basename(path))[0]
            name, n = f"{stem}.jpg", 1
            while name in used:  # photos/a.png and more/a.jpg both get an output
                name, n = f"{stem}_{n}.jpg", n + 1
            used.add(name)
            save_image(draw(image, det, cfg.class_names), os.path.join(args.out, name))
            det = {**det, "boxes": det["boxes"] * scale}  # in the file's own pixels
            by_path[path] = det
            print(f"{path}  {image.shape[2] * scale:.0f}x{image.shape[1] * scale:.0f}  {len(det['boxes'])} detections"
                  f"  {seconds * 1000:.0f} ms  -> {os.path.join(args.out, name)}")
            for box, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                cls = cfg.class_names[lab] if lab < len(cfg.class_names) else str(lab)
                print(f"    {cls:<16} {s:.3f}  [{', '.join(f'{v:.0f}' for v in box)}]")
            if args.json:
                cat_ids = cfg.category_ids or tuple(range(1, cfg.num_classes + 1))
                for r in coco_results([det], [image_id(path, len(by_path) - 1)], cat_ids):
                    results.append({**r, "file_name": os.path.basename(path)})
    if args.json:
        D.write_json(args.json, results)
    return by_path, failed


if __name__ == "__main__":
    try:
        _, failed = main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    sys.exit(1 if failed else 0)

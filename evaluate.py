"""COCO evaluation (§5): a model's detections on a COCO-format set, scored by pycocotools, overall and per class.

    python train.py --eval-only --weights runs/quickstart/checkpoint.pt       # the quick start's val set
    python analyze.py eval --weights CKPT --data DATA --split val2017

The model detects on each image (model.detect), its labels become the dataset's category ids through the
checkpoint's own `category_ids` (a model trained on COCO knows COCO's ids; torchvision's 91 outputs are indexed
by category id), and COCOeval scores the results: the 12 summary numbers (AP at IoU .50:.05:.95, AP50, ...) and
AP and AP50 per class, worst first, printed and written to eval.json. A model whose classes are not the
dataset's is refused before any image is run.
"""
import contextlib
import io
import os
from collections import Counter

import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

import data as D
import model as M

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def category_ids(cfg, ds):
    """The dataset category id of each of the model's labels, checked: every category of the dataset
    must be one the model knows, by id and (when the checkpoint has names) by name. A checkpoint
    without category ids is taken to use the dataset's labels when it has as many classes.
    ValueError, naming the annotation file, when the model was trained on other classes."""
    where = f"{ds.ann_file}: the model's classes are not this dataset's"
    ids = tuple(cfg.category_ids)
    if not ids:
        if cfg.num_classes != len(ds.cat_ids):
            raise ValueError(f"{where} ({len(ds.cat_ids)} categories here, {cfg.num_classes} in the checkpoint)")
        ids = tuple(ds.cat_ids)
    if len(ids) != cfg.num_classes:
        raise ValueError(f"{where}: the checkpoint has {cfg.num_classes} classes but {len(ids)} category ids")
    label = {c: i for i, c in enumerate(ids)}
    for c, name in zip(ds.cat_ids, ds.class_names):
        theirs = cfg.class_names[label[c]] if c in label and label[c] < len(cfg.class_names) else None
        if c not in label or (cfg.class_names and theirs != name):
            known = ", ".join(map(str, cfg.class_names[:4])) or f"ids {', '.join(map(str, ids[:4]))}"
            raise ValueError(f"{where}: category {c} ({name!r}) is {repr(theirs) if c in label else 'unknown'} "
                             f"in the checkpoint ({cfg.num_classes} classes: {known}, ...)")
    return ids


def model_labels(cfg, ds):
    """(K_dataset,) the model's label of each of the dataset's labels, checked as category_ids checks:
    a project model's label is the dataset's own, torchvision's the COCO category id (91 outputs)."""
    label = {c: i for i, c in enumerate(category_ids(cfg, ds))}
    return torch.tensor([label[c] for c in ds.cat_ids])


@torch.inference_mode()
def evaluate(model, ds, batch_size=8, rank=0, world=1, out_dir=None, workers=0, score_thresh=None, amp=False):
    """COCO AP of model on ds with pycocotools. Each rank detects its share of the images; rank 0
    gathers, scores, prints the per-class table and writes results.json and eval.json into out_dir. Returns the
    12 COCO numbers and "per_class" (coco_evaluate).
    score_thresh: detections kept (default the model's, the paper's 0.05; §4 "Inference"); amp: the network
    under autocast (model.detect)."""
    ids = category_ids(model.cfg, ds)  # before any image: a wrong model fails in a second, not after the run
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=list)
    results = []
    for batch in tqdm(loader, desc="eval", disable=rank != 0, leave=False):
        detections = M.detect(model, [image for image, _ in batch], score_thresh, amp)
        results += coco_results(detections, [t["image_id"] for _, t in batch], ids)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank != 0:
        return None
    known = set(ds.cat_ids)  # torchvision's model also has outputs for ids COCO never used ("N/A")
    results = [r for r in results if r["category_id"] in known]
    stats = coco_evaluate(ds.coco, results, image_ids=ds.ids)
    print(format_per_class(stats["per_class"]), flush=True)
    if out_dir:
        D.write_json(os.path.join(out_dir, "results.json"), results)
        D.write_json(os.path.join(out_dir, "eval.json"), stats)
    return stats


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
    """COCOeval (bbox) of COCO results against coco_gt, on image_ids (default all): the 12 summary numbers, and
    "per_class", per_class_ap's table."""
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else image_ids) if coco_gt is not None else []
    if not results:
        return {**dict.fromkeys(STATS, 0.0), "per_class": per_class_ap(coco_gt, image_ids, None)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = image_ids
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    ev.summarize()
    return {**{k: float(v) for k, v in zip(STATS, ev.stats)}, "per_class": per_class_ap(coco_gt, image_ids, ev)}


def per_class_ap(coco_gt, image_ids, ev):
    """AP and AP50 of each category, worst first, from COCOeval's accumulated precision (T IoUs, R recall points,
    K categories, A area ranges, M max detections): AP is its mean over T and R at area "all" and 100 detections,
    as the summary's AP is over T, R and K, so the mean of the classes' APs is pycocotools' AP. A category with
    no box in image_ids has AP None (pycocotools' -1) and comes last. Rows: category_id, name, AP, AP50, boxes."""
    if coco_gt is None:
        return []
    counts = Counter(a["category_id"] for i in image_ids for a in coco_gt.imgToAnns[i] if not a.get("iscrowd"))
    rows = []
    for k, c in enumerate(sorted(coco_gt.getCatIds())):  # COCOeval's K order: params.catIds, sorted
        boxes = counts[c]
        ap = ap50 = None
        if ev is not None:
            p = ev.eval["precision"][:, :, k, 0, -1]  # (T, R): area "all", maxDets 100
            ap = float(p[p > -1].mean()) if (p > -1).any() else None
            ap50 = float(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else None
        elif boxes:
            ap = ap50 = 0.0  # no detections at all: every class with boxes scores 0
        rows.append({"category_id": c, "name": coco_gt.cats[c].get("name", str(c)), "AP": ap, "AP50": ap50,
                     "boxes": boxes})
    return sorted(rows, key=lambda r: (r["AP"] is None, r["AP"] if r["AP"] is not None else 0, r["AP50"] or 0))


def format_per_class(rows):
    """per_class_ap's table as text, one class a line, worst first."""
    lines = ["per-class AP, worst first:", f"{'AP':>6} {'AP50':>6} {'boxes':>6}  class (category id)"]
    for r in rows:
        ap, ap50 = ("   n/a" if v is None else f"{v:6.3f}" for v in (r["AP"], r["AP50"]))
        lines.append(f"{ap} {ap50} {r['boxes']:6d}  {r['name']} ({r['category_id']})")
    return "\n".join(lines)

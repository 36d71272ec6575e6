"""COCO evaluation of a detector (§5: COCO AP), the one evaluation function train.py and analyze.py use.

    python train.py --eval-only --weights runs/quickstart/checkpoint.pt            # on the shapes val split
    python train.py --data /path/to/coco --eval-only --weights torchvision         # torchvision's COCO model
    python analyze.py eval --weights CKPT --data DATA --split val2017

The model detects on each image (model.detect), its labels become the dataset's category ids
through the checkpoint's own `category_ids` (a model trained on COCO knows COCO's ids; torchvision's
91 outputs are indexed by category id), and pycocotools scores the results (data.coco_evaluate).
A model whose classes are not the dataset's is refused before any image is run.
"""
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M


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
def evaluate(model, ds, batch_size=8, rank=0, world=1, out_dir=None, workers=0, score_thresh=None):
    """COCO AP of model on ds with pycocotools. Each rank detects its share of the images; rank 0
    gathers, scores, and writes results.json and eval.json into out_dir. Returns the 12 COCO numbers.
    score_thresh: detections kept (default the model's, the paper's 0.05; §4 "Inference")."""
    ids = category_ids(model.cfg, ds)  # before any image: a wrong model fails in a second, not after the run
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=list)
    results = []
    for batch in tqdm(loader, desc="eval", disable=rank != 0, leave=False):
        detections = M.detect(model, [image for image, _ in batch], score_thresh)
        results += D.coco_results(detections, [t["image_id"] for _, t in batch], ids)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank != 0:
        return None
    known = set(ds.cat_ids)  # torchvision's model also has outputs for ids COCO never used ("N/A")
    results = [r for r in results if r["category_id"] in known]
    stats = D.coco_evaluate(ds.coco, results, image_ids=ds.ids)
    if out_dir:
        D.write_json(os.path.join(out_dir, "results.json"), results)
        D.write_json(os.path.join(out_dir, "eval.json"), stats)
    return stats

"""analyze.py: Fig. 1 against Eq. 5, Fig. 4's CDFs against training's loss, the cache, anchor coverage by hand,
where the loss goes (fig4.loss_shares) by hand."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import data as D
import fig4
import model as M
import train
import weights as W
from conftest import analyze_args as args
from conftest import shared_path
from loss import LossConfig, assign_targets, retinanet_loss


def test_curves_match_eq5_at_sample_points(tmp_path):
    analyze.main(args("curves", "--out", tmp_path))
    table = json.load(open(tmp_path / "curves.json"))
    p_t = np.array(table["p_t"])
    for i in (0, 249, 499, 899, 998):
        for gamma in analyze.GAMMAS:
            expected = -((1 - p_t[i]) ** gamma) * math.log(p_t[i])  # Eq. 5 with alpha_t = 1
            assert table[f"gamma={gamma:g}"][i] == pytest.approx(expected, rel=1e-5)
    assert os.path.getsize(tmp_path / "curves.png") > 10_000


def test_negative_gamma_is_refused():
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        analyze.main(args("curves", "--gammas", "2", "-1"))


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tiny_shapes):
    model = W.load_checkpoint(tiny_checkpoint)
    ds = analyze.dataset(analyze.split_paths(tiny_shapes, "val"), model.cfg, train_like=True)
    return model, ds, fig4.collect_logits(model, ds, batch_size=2, progress=lambda it, total: it)


def test_cdfs_are_monotone_and_end_at_one(run):
    _, _, logits = run
    for kind in ("pos", "neg"):
        for gamma in analyze.GAMMAS:
            x, y, shares = fig4.cdf(logits[kind], gamma)
            assert y[0] == 0 and y[-1] == pytest.approx(1.0) and (np.diff(y) >= -1e-12).all()
            assert 0 <= shares["hardest 1%"] <= shares["hardest 20%"] <= 1


def test_gamma_zero_losses_are_the_cross_entropy_training_computes(run):
    """Sum of CE over the collected samples == retinanet_loss(gamma=0, alpha=None)'s classification
    sum over the same images: the same anchors, assigned the same way."""
    model, ds, logits = run
    cfg = model.cfg
    ours = fig4.focal_values(logits["pos"], 0).sum() + fig4.focal_values(logits["neg"], 0).sum()
    expected, num_fg = 0.0, []
    for start in range(0, len(ds), 2):
        images, targets = D.collate([ds[i] for i in range(start, min(start + 2, len(ds)))], cfg.size_divisible)
        with torch.no_grad():
            cls_logits, box_deltas = model(M.normalize(images, cfg))
        anchors, _ = M.make_anchors(cfg, images.shape[-2:])
        losses = retinanet_loss(cls_logits, box_deltas, anchors, [t["boxes"] for t in targets],
                                [t["labels"] for t in targets], LossConfig(alpha=None, gamma=0.0),
                                reduce_num_fg=lambda n: num_fg.append(n) or n)
        expected += losses["cls"].item() * max(1.0, num_fg[-1].item())
    assert ours == pytest.approx(expected, rel=1e-4)
    assert len(logits["neg"]) > 100 * len(logits["pos"])  # far more background than objects


def test_hardest_shares_of_a_hand_made_set():
    ce = np.array([1.0] * 98 + [10.0, 30.0])  # CE of 100 negatives; the hardest one carries 30 / 138
    z = -np.log(np.expm1(ce))  # softplus(-z) = CE
    z = -np.sort(-z)  # easy first, as collect_logits sorts
    _, y, shares = fig4.cdf(z, gamma=0.0)
    assert shares["hardest 1%"] == pytest.approx(30 / 138, rel=1e-5)
    assert shares["hardest 20%"] == pytest.approx((18 + 40) / 138, rel=1e-5)


def test_cache_reproduces_the_model_run(run, tmp_path, monkeypatch):
    model, ds, logits = run
    cache = str(tmp_path / "cache.npz")
    fresh = fig4.load_or_collect(model, ds, cache, "key-1", batch_size=2, progress=lambda it, total: it)
    monkeypatch.setattr(fig4, "collect_logits", lambda *a, **kw: pytest.fail("the model ran again"))
    cached = fig4.load_or_collect(model, ds, cache, "key-1")
    for kind in ("pos", "neg"):
        assert np.array_equal(cached[kind], fresh[kind]) and np.array_equal(cached[kind], logits[kind])
    with pytest.raises(pytest.fail.Exception):  # another checkpoint or dataset: a new model run
        fig4.load_or_collect(model, ds, cache, "key-2")


def test_cdf_command_saves_the_curves_and_keys_its_cache_by_image_count(tiny_checkpoint, tiny_shapes, tmp_path):
    cdf = ["cdf", "--weights", tiny_checkpoint, "--data", tiny_shapes, "--max-negatives", 1000, "--out", tmp_path]
    analyze.main(args(*cdf, "--max-images", 2))
    saved = json.load(open(tmp_path / "cdf.json"))
    assert saved["images"] == 2 and saved["negatives"] <= 1000 < saved["negatives_seen"]  # a sample beyond the cap
    assert set(saved["curves"]) - {"fraction"} == set(saved["gammas"]) == set(saved["where"])  # the curves too
    analyze.main(args(*cdf, "--max-images", 3))  # another image count: a new model run, not the cache of 2
    assert json.load(open(tmp_path / "cdf.json"))["images"] == 3


def test_anchor_coverage_of_hand_made_boxes(tmp_path):
    cfg = M.ModelConfig(anchor_scales=(1.0,), anchor_ratios=(1.0,), min_size=256, max_size=256)  # squares
    boxes = [[0, 0, 32, 32],  # exactly the 32-px anchor at (16, 16): IoU 1
             [200, 200, 210, 210],  # inside 3 x 3 anchors of 32 px: IoU 100 / 1024, all nine claimed
             [94, 80, 114, 128]]  # 20 x 48 around the anchor at (104, 104): 640 / 1344, the ignore band
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (256, 256)).save(tmp_path / "imgs" / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 256, "height": 256}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]} for i, (x1, y1, x2, y2) in enumerate(boxes)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = D.CocoDetection(str(tmp_path / "ann.json"), str(tmp_path / "imgs"), train=True, min_size=256,
                         max_size=256, flip=0.0)
    rows = analyze.anchor_coverage(cfg, ds)
    assert [r["best_iou"] for r in rows] == pytest.approx([1.0, 100 / 1024, 640 / 1344], rel=1e-5)
    assert [r["level"] for r in rows] == [3, 3, 3] and rows[1]["positives"] == 9
    assert rows[0]["positives"] >= 1 and rows[2]["positives"] >= 1  # the low-quality match claims it


def test_anchors_command_on_real_coco_photos(tmp_path):
    summary = analyze.main(args("anchors", "--data", shared_path("coco_val2017_subset"), "--split", "val2017",
                                "--out", tmp_path))
    assert summary["boxes"] == 253 and 0.5 < summary["best IoU >= 0.5"] < 1
    assert summary["best IoU >= 0.4"] >= summary["best IoU >= 0.5"]


def test_suggest_covers_8_to_1_boxes_the_papers_anchors_miss(tmp_path):
    """A set of 8:1 bars (and some squares) at 160 px: the paper's ratios (1:2 .. 2:1) reach IoU 0.5 on none of the
    bars; --suggest's proposal, matched as training matches (every anchor), covers nearly all, and its flags are
    train.py's."""
    g, images, anns = torch.Generator().manual_seed(0), [], []
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.new("RGB", (160, 160)).save(tmp_path / "imgs" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 160, "height": 160})
        for k in range(4):
            h = 10 + 8 * float(torch.rand(1, generator=g))  # under ~8 px high no P3 anchor (stride 8) can reach 0.5
            w = 8 * h if k < 3 else h  # three bars, one square
            x, y = (torch.rand(2, generator=g) * torch.tensor([160 - w, 160 - h])).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "bbox": [x, y, w, h]})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "bar"}]}))
    summary = analyze.main(args("anchors", "--suggest", "--ann", tmp_path / "ann.json", "--images", tmp_path / "imgs",
                                "--scale", 160, "--max-size", 160, "--out", tmp_path / "out"))
    s, bars = summary["suggest"], [r for r in json.load(open(tmp_path / "out" / "anchors.json"))["boxes"]]
    assert summary["boxes"] == 32 and s["before"] <= 0.25 and s["after"] >= 0.9  # the 8 squares at most, before
    assert min(s["anchor_ratios"]) <= 0.25 and sum(b["boxes"] for b in s["bands"]) == 32 and len(bars) == 32
    flags = train.get_args_parser().parse_args(s["flags"].split())
    assert (tuple(flags.anchor_sizes), tuple(flags.anchor_ratios)) == (tuple(s["anchor_sizes"]), tuple(
        pytest.approx(r, abs=1e-4) for r in s["anchor_ratios"]))


def test_checkpoint_classes_must_match_the_dataset(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="instances_val2017.json: the model's classes are not this dataset's"):
        analyze.main(args("cdf", "--weights", tiny_checkpoint, "--data", shared_path("coco_val2017_subset"),
                          "--split", "val2017", "--out", tmp_path))


def test_a_model_numbering_classes_otherwise_sees_the_same_positives(run):
    """As torchvision's COCO model (label = category id, 91 outputs): the same class subnet with its
    classes reversed after an extra unknown class gives the same positive logits; a model's labels, not
    the dataset's, index its outputs."""
    model, ds, logits = run
    cfg, k = model.cfg, model.cfg.num_classes
    other = M.RetinaNet(dataclasses.replace(cfg, num_classes=k + 1, category_ids=(999, *ds.cat_ids[::-1]),
                                            class_names=("extra", *cfg.class_names[::-1])))
    state = model.state_dict()
    for name in ("cls_head.out.weight", "cls_head.out.bias"):  # (A*K, ...) -> (A, K, ...), reversed, one more
        w = state[name].unflatten(0, (cfg.num_anchors, k)).flip(1)
        state[name] = torch.cat([torch.zeros_like(w[:, :1]), w], 1).flatten(0, 1)
    other.load_state_dict(state)
    theirs = fig4.collect_logits(other.eval(), ds, batch_size=2, progress=lambda it, total: it)
    np.testing.assert_allclose(theirs["pos"], logits["pos"], rtol=1e-5, atol=1e-5)
    assert len(theirs["neg"]) > len(logits["neg"])


def test_empty_dataset_is_an_error(run):
    model, ds, _ = run
    with pytest.raises(ValueError, match="no images"):
        fig4.collect_logits(model, ds, max_images=0)


def test_eval(tiny_shapes, tiny_checkpoint, tmp_path):
    stats = analyze.main(args("eval", "--weights", tiny_checkpoint, "--data", tiny_shapes, "--out", tmp_path))
    assert json.load(open(tmp_path / "eval.json")) == stats


def test_eval_score_threshold_keeps_the_same_detections_above_it(tiny_shapes, tiny_checkpoint, tmp_path):
    def results(*flags):
        analyze.main(args("eval", "--weights", tiny_checkpoint, "--data", tiny_shapes, "--out", tmp_path, *flags))
        with open(tmp_path / "results.json") as f:
            return {(r["image_id"], r["category_id"], r["score"], *r["bbox"]) for r in json.load(f)}

    default = results()  # the checkpoint's 0.05
    scores = sorted({r[2] for r in default})  # rounded to 5 decimals: t lies well between two of them
    t = next((a + b) / 2 for a, b in zip(scores[len(scores) // 2:], scores[len(scores) // 2 + 1:]) if b - a > 1e-4)
    above = results("--score-thresh", str(t))
    assert 0 < len(above) < len(default)  # the flag reached detection
    assert above == {r for r in default if r[2] > t}  # thresholding, top-k and NMS keep the same boxes above t


class Images(list):
    """Hand-made (image, target) pairs as a dataset: labelled with the model's own classes."""


def test_collected_samples_are_the_images_own_whatever_the_batch_size(tiny_checkpoint):
    # sizes that pad: 90x90 and 80x96 both pad to 96x96 and batch together; 70x120 pads to 96x128
    model = W.load_checkpoint(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    ds = Images(((torch.rand(3, h, w, generator=g) * 255).to(torch.uint8),
                 {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0]]), "labels": torch.tensor([1])})
                for h, w in ((90, 90), (70, 120), (80, 96)))
    ds.ann_file, ds.cat_ids, ds.class_names = "hand-made", list(model.cfg.category_ids), model.cfg.class_names
    one = fig4.collect_logits(model, ds, batch_size=1, progress=lambda it, total: it)
    three = fig4.collect_logits(model, ds, batch_size=3, progress=lambda it, total: it)
    for kind in ("pos", "neg"):
        np.testing.assert_allclose(one[kind], three[kind], rtol=1e-4, atol=1e-4)
    # every sample is one of an image's own anchors (centre inside it) outside the ignore band, K a anchor
    expected = 0
    for image, target in ds:
        anchors = M.make_anchors(model.cfg, [-(-s // 32) * 32 for s in image.shape[1:]])[0]
        _, _, _, keep = assign_targets(anchors, [target["boxes"]], [target["labels"]], model.cfg.num_classes)
        centre = (anchors[:, :2] + anchors[:, 2:]) / 2
        inside = (centre[:, 0] < image.shape[2]) & (centre[:, 1] < image.shape[1])
        expected += int((keep[0] & inside).sum()) * model.cfg.num_classes
    assert len(one["pos"]) + one["negatives_seen"] == expected


def test_negatives_beyond_the_cap_are_a_uniform_sample_of_all():
    sample = fig4.UniformSample(cap=2_000, seed=0)
    sample.add(torch.zeros(20_000))  # a batch with many negatives (pruned at once: over 2 x cap)
    sample.add(torch.ones(2_200))  # one with few: a share of the cap per batch would keep 1,000 of these
    kept = sample.result()
    assert len(kept) == 2_000 and sample.seen == 22_200
    assert 160 <= int(kept.sum()) <= 240  # ~2,200 x 2,000 / 22,200 = 198: one rate for every negative


def test_anchor_coverage_defaults_to_the_datasets_own_configuration(tiny_shapes):
    name, cfg = analyze.preset_config(D.coco_paths(tiny_shapes, "val")[0])
    assert name == "quickstart" and cfg.anchor_sizes == (16, 32, 64, 128, 256) and cfg.min_size == 160
    name, cfg = analyze.preset_config(D.coco_paths(shared_path("coco_val2017_subset"), "val2017")[0])
    assert name == "paper" and cfg.anchor_sizes == (32, 64, 128, 256, 512) and cfg.min_size == 800


def test_loss_shares_by_hand():
    # one positive at p_t = .5 and negatives at p_t = .9 and .99 (z = log(p_t / (1 - p_t)))
    z_pos, z_neg = [0.0], [math.log(9), math.log(99)]
    for gamma in (0.0, 2.0):
        fl = [(1 - p) ** gamma * -math.log(p) for p in (0.5, 0.9, 0.99)]  # Eq. 4
        dfl = [(1 - p) ** gamma * (1 - p - gamma * p * math.log(p)) for p in (0.5, 0.9, 0.99)]  # |dFL/dz|
        shares = fig4.loss_shares(z_pos, z_neg, gamma)
        for key, values in (("loss", fl), ("grad", dfl)):
            got = shares[key]
            assert got["positives"] == pytest.approx(values[0] / sum(values))
            assert got["negatives 0.5 < p_t <= 0.9"] == pytest.approx(values[1] / sum(values))  # p_t = .9: <= .9
            assert got["negatives 0.9 < p_t <= 0.99"] == pytest.approx(values[2] / sum(values))
            assert got["negatives p_t <= 0.5"] == got["negatives p_t > 0.99"] == 0
    ce = fig4.loss_shares(z_pos, z_neg, 0.0, neg_weight=10)  # each negative stands for ten
    assert ce["loss"]["positives"] == pytest.approx(math.log(2) / (math.log(2) - 10 * math.log(0.9 * 0.99)))
    alpha = fig4.loss_shares(z_pos, z_neg, 0.0, alpha=0.25)  # alpha .25 on the positive, .75 on negatives
    pos, neg = 0.25 * math.log(2), -0.75 * math.log(0.9 * 0.99)
    assert alpha["loss"]["positives"] == pytest.approx(pos / (pos + neg))

"""data.py: the real COCO subset through pycocotools, augmentation geometry, bad files, batching, evaluation."""
import json
import os

import pytest
import torch

import data as D
from conftest import shared_path


def coco_subset(**kw):
    return D.CocoDetection(*D.coco_paths(shared_path("coco_val2017_subset"), "val2017"), **kw)


def test_coco_subset_yields_253_non_crowd_boxes_with_their_labels():
    ds = coco_subset()
    raw = json.load(open(D.coco_paths(shared_path("coco_val2017_subset"), "val2017")[0]))
    cat_ids = sorted(c["id"] for c in raw["categories"])
    assert len(ds) == 20 and len(ds.class_names) == 80 and ds.cat_ids == cat_ids
    assert sum(len(boxes) for boxes, _ in ds.targets) == 253
    for i in range(len(ds)):
        image, target = ds[i]
        anns = [a for a in raw["annotations"] if a["image_id"] == target["image_id"] and not a["iscrowd"]]
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and tuple(image.shape[1:]) == target["orig_size"]
        torch.testing.assert_close(target["boxes"], expected_boxes)
        assert [ds.cat_ids[lab] for lab in target["labels"].tolist()] == [a["category_id"] for a in anns]


def test_flipped_and_resized_sample_keeps_its_boxes_on_the_objects():
    plain = coco_subset()
    augmented = coco_subset(train=True, min_size=400, max_size=1000, flip=1.0)
    for i in (0, 7):
        image, target = plain[i]
        big, moved = augmented[(i, 123)]
        (h, w), (H, W) = image.shape[1:], big.shape[1:]
        assert min(H, W) == 400
        sx, sy = W / w, H / h
        b = target["boxes"]
        expected = torch.stack([(w - b[:, 2]) * sx, b[:, 1] * sy, (w - b[:, 0]) * sx, b[:, 3] * sy], dim=1)
        torch.testing.assert_close(moved["boxes"], expected, rtol=1e-4, atol=1e-3)
        assert torch.equal(moved["labels"], target["labels"])


def test_sample_seed_fixes_the_augmentation():
    ds = coco_subset(train=True, min_size=200, max_size=400, scales=[160, 200, 240], flip=0.5)
    first = [ds[(3, seed)][0].shape for seed in range(8)]
    assert first == [ds[(3, seed)][0].shape for seed in range(8)]
    assert len(set(first)) > 1  # different seeds, different scales


def write_coco(tmp_path, images, annotations, files=()):
    os.makedirs(tmp_path / "imgs", exist_ok=True)
    for name, content in files:
        (tmp_path / "imgs" / name).write_bytes(content)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 3, "name": "thing"}]}))
    return str(path), str(tmp_path / "imgs")


def test_bad_annotation_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: annotation file not found"):
        D.CocoDetection(str(tmp_path / "nope.json"), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        D.CocoDetection(str(broken), str(tmp_path))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: not COCO instances format"):
        D.CocoDetection(str(listed), str(tmp_path))
    with pytest.raises(ValueError, match="ann.json: the dataset has no images"):
        D.CocoDetection(*write_coco(tmp_path, [], []))
    image = [{"id": 1, "file_name": "a.jpg", "width": 96, "height": 96}]
    box = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0}
    with pytest.raises(ValueError, match="ann.json: annotation 7 has category_id 999, which is not among its 1 "
                                         "categories"):
        D.CocoDetection(*write_coco(tmp_path, image, [{**box, "id": 6}, {**box, "id": 7, "category_id": 999}]))
    with pytest.raises(ValueError, match="ann.json: annotation 8 has image_id 2, which is not among its 1 images"):
        D.CocoDetection(*write_coco(tmp_path, image, [{**box, "id": 8, "image_id": 2}]))


def test_bad_boxes_are_counted_and_bad_images_skipped(tmp_path, tiny_shapes):
    good = open(os.path.join(tiny_shapes, "val", "000001.jpg"), "rb").read()
    images = [{"id": i, "file_name": n, "width": 96, "height": 96} for i, n in
              ((1, "missing.jpg"), (2, "garbage.jpg"), (3, "good.jpg"))]
    anns = [{"id": 1, "image_id": 3, "category_id": 3, "bbox": [10, 10, 0.5, 20], "iscrowd": 0},  # under 1 px
            {"id": 2, "image_id": 3, "category_id": 3, "bbox": [80, 10, 40, 20], "iscrowd": 0},  # beyond the edge
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [1, 1, 30, 30], "iscrowd": 1}]  # crowd
    with pytest.warns(UserWarning, match="1 boxes clipped to their image, 1 under 1 px dropped"):
        ds = D.CocoDetection(*write_coco(tmp_path, images, anns, [("garbage.jpg", b"not a jpeg"), ("good.jpg", good)]))
    with pytest.warns(UserWarning) as record:
        image, target = ds[0]  # missing, then garbage, then the good image
    messages = [str(w.message) for w in record]
    assert "missing.jpg: skipped" in messages[0] and "garbage.jpg: skipped" in messages[1]
    assert target["image_id"] == 3 and image.shape == (3, 96, 96)
    torch.testing.assert_close(target["boxes"], torch.tensor([[80.0, 10.0, 96.0, 30.0]]))


def test_collate_pads_to_a_multiple_with_the_fill_colour():
    a, b = torch.full((3, 100, 130), 7, dtype=torch.uint8), torch.full((3, 129, 60), 9, dtype=torch.uint8)
    images, targets = D.collate([(a, {"n": 0}), (b, {"n": 1})], size_divisible=128, fill=(1, 2, 3))
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.uint8
    assert images[0, :, :100, :130].eq(7).all()
    assert images[0, :, 100:, :].eq(torch.tensor([1, 2, 3])[:, None, None]).all()
    assert [t["n"] for t in targets] == [0, 1]


def test_batch_stream_without_groups_is_one_shuffled_stream_cut_in_batches():
    stream = D.BatchStream(10, 4, seed=3, start_iter=0, iters=6)
    batches = list(stream)
    assert [p for b in batches for _, p in b] == list(range(24))  # positions 0..23 in order, epochs run on
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()  # epoch 1's order
    assert [i for b in batches for i, p in b if 10 <= p < 20] == perm


def test_aspect_grouped_batches_are_one_orientation_and_the_same_for_any_ranks_and_resume():
    groups = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    one = list(D.BatchStream(len(groups), 4, 0, 0, 30, groups=groups))
    assert all(len({groups[i] for i, _ in b}) == 1 for b in one) and all(len(b) == 4 for b in one)
    positions = [p for b in one for _, p in b]
    assert len(set(positions)) == len(positions)  # every stream position used once
    assert set(range(max(positions) - 8)) <= set(positions)  # only the last few wait in a buffer
    ranks = [list(D.BatchStream(len(groups), 4, 0, 0, 30, rank=r, world=2, groups=groups)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert list(D.BatchStream(len(groups), 4, 0, 17, 30, groups=groups)) == one[17:]


def test_aspect_grouping_and_padding_to_32_cut_the_padding_of_coco_batches():
    """Batches of 2 of the 20 COCO photos at 800 px, through the training pipeline's resize and collate:
    batch pixels per image pixel (1.0 = no padding), for an epoch of the training batch stream."""
    ds = coco_subset(train=True, min_size=800, max_size=1333, flip=0.0)
    sizes = [tuple(ds[(i, 0)][0].shape[1:]) for i in range(len(ds))]
    groups = ds.aspect_groups()
    assert groups == [int(h > w) for h, w in sizes]

    def ratio(grouped, divisible):
        batched = real = 0
        for batch in D.BatchStream(len(ds), 2, 0, 0, 10, groups=groups if grouped else None):
            images, _ = D.collate([(torch.zeros(3, *sizes[i], dtype=torch.uint8), {}) for i, _ in batch], divisible)
            batched += images[:, 0].numel()
            real += sum(sizes[i][0] * sizes[i][1] for i, _ in batch)
        return batched / real

    before, grouped_128, grouped_32 = ratio(False, 128), ratio(True, 128), ratio(True, 32)
    print(f"batch pixels per image pixel: {before:.3f} ungrouped at 128, {grouped_128:.3f} grouped at 128, "
          f"{grouped_32:.3f} grouped at 32, {ratio(False, 32):.3f} ungrouped at 32")
    assert grouped_32 < grouped_128 < before
    assert grouped_32 < 1.1


def test_write_atomic_never_leaves_a_half_written_file(tmp_path):
    path = str(tmp_path / "results.json")
    D.write_json(path, {"a": 1})

    def interrupted(tmp):  # a write that dies half-way (a full disk, a kill)
        with open(tmp, "w") as f:
            f.write('{"a": 2, "b"')
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        D.write_atomic(path, interrupted)
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]  # the old file, whole

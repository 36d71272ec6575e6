"""study/pretrain.py: crops centred on the dense set's objects and on background, and a trunk train.py loads."""
import torch

import data as D
from backbone import Backbone
from study import dense, pretrain


def test_crops_are_centred_on_each_object_and_one_background_an_image(tmp_path):
    root = dense.make_dense(str(tmp_path / "dense"), num_train=6, num_val=2, seed=4)
    ds = D.CocoDetection(*D.coco_paths(root, "train"))
    images, labels = pretrain.crops(ds, size=64)
    objects = sum(len(b) for b, _ in ds.targets)
    assert images.shape == (objects + len(ds), 3, 64, 64) and images.dtype == torch.uint8
    assert (labels == len(ds.cat_ids)).sum() == len(ds)  # one background crop a picture
    first_box, first_label = ds.targets[0][0][0], ds.targets[0][1][0]
    assert labels[0] == first_label
    # the first crop is the image around its first object's centre, moved by at most size / 8 = 8 px
    image, _ = ds[0]
    padded = torch.nn.functional.pad(image, (32, 32, 32, 32), value=128)
    cx, cy = (int(round(float(v))) for v in ((first_box[0] + first_box[2]) / 2, (first_box[1] + first_box[3]) / 2))
    shifts = [(dx, dy) for dx in range(-9, 10) for dy in range(-9, 10) if 0 <= cy + dy and 0 <= cx + dx
              and torch.equal(padded[:, cy + dy:cy + dy + 64, cx + dx:cx + dx + 64], images[0])]
    assert shifts


def test_the_pretrained_trunk_loads_as_a_frozen_backbone(tmp_path):
    root = dense.make_dense(str(tmp_path / "dense"), num_train=8, num_val=2, seed=5)
    out = str(tmp_path / "resnet18.pth")
    accuracy = pretrain.pretrain(root, out, epochs=1, batch_size=4)
    assert 0 <= accuracy <= 1
    state = torch.load(out, weights_only=True)
    assert "layer4.1.bn2.running_var" in state and not any(k.startswith("fc.") for k in state)
    backbone = Backbone("resnet18", norm="frozen", freeze_at=2, weights=out)
    torch.testing.assert_close(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])

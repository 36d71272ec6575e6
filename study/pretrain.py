"""A pretrained backbone for the Table 1 study: the ImageNet stand-in (§4.1 "Initialization", §5.1).

The paper fine-tunes a ResNet pretrained on ImageNet, with its batch norm frozen. Offline there are no
ImageNet weights, and a ResNet-18 from scratch learns the dense set's 30 classes too slowly for a study of
tens of runs on a CPU (COCO AP 0.012 after 400 iterations). So, once, a ResNet-18 learns to classify
64x64 crops of the dense set's training images, centred on its objects (30 classes) or anywhere else
(one more class: background, clutter and the hard negatives), with softmax cross entropy: no detection
loss is involved, so the study's losses all start from the same, neutral features, as from ImageNet.
The trunk is saved as a torchvision ResNet state dict, which train.py --backbone-weights loads (study.dense.DENSE).

    python -m study.pretrain                    # data/dense -> runs/pretrain/resnet18_dense.pth (~5-10 minutes)
"""
import argparse
import os

import torch
import torch.nn.functional as F
import torchvision

import data as D
from study import dense

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # model.ModelConfig's normalisation


def crops(ds, size=64, seed=0):
    """(images (C, 3, size, size) uint8, labels (C,)): a crop centred on each object (its class, the centre
    jittered by up to size/8) and one a picture centred away from every object (len(ds.cat_ids): no object)."""
    g, out, labels, half = torch.Generator().manual_seed(seed), [], [], size // 2
    for i in range(len(ds)):
        image, target = ds[i]
        padded = F.pad(image, (half, half, half, half), value=128)  # crops reach over the border
        h, w = image.shape[1:]
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, int(lab))
                   for b, lab in zip(target["boxes"].tolist(), target["labels"].tolist())]
        for _ in range(20):  # a background centre: no object box contains it
            x, y = (torch.rand(2, generator=g) * torch.tensor([w, h])).tolist()
            if not any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in target["boxes"].tolist()):
                centres.append((x, y, len(ds.cat_ids)))
                break
        for x, y, label in centres:
            dx, dy = ((torch.rand(2, generator=g) - 0.5) * size / 4).tolist()
            x0, y0 = (min(max(int(round(c)), 0), s) for c, s in ((x + dx, w), (y + dy, h)))  # corner, when padded
            out.append(padded[:, y0:y0 + size, x0:x0 + size])
            labels.append(label)
    return torch.stack(out), torch.tensor(labels)


def pretrain(data="data/dense", out=dense.BACKBONE, epochs=8, batch_size=64, lr=0.1, seed=0):
    """Train ResNet-18 on crops of data's train split; save its trunk (no classifier) to out. Returns val accuracy."""
    torch.manual_seed(seed)
    sets = {s: D.CocoDetection(*D.coco_paths(data, s)) for s in ("train", "val")}
    (x, y), (vx, vy) = crops(sets["train"], seed=seed), crops(sets["val"], seed=seed + 1)
    net = torchvision.models.resnet18(num_classes=len(sets["train"].cat_ids) + 1)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(batch_size)[: len(x) // batch_size]:
            batch = (x[idx].float() / 255 - mean) / std
            flip = torch.rand(len(idx)) < 0.5
            batch[flip] = batch[flip].flip(-1)  # the detector trains with flips too
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            accuracy = sum((net((vx[i].float() / 255 - mean) / std).argmax(1) == vy[i]).sum().item()
                           for i in torch.arange(len(vx)).split(256)) / len(vx)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, val accuracy {accuracy:.3f} ({len(vx)} crops)")
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    D.write_atomic(out, lambda tmp: torch.save(state, tmp))
    return accuracy


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/dense", help="the dense set (written first if missing)")
    p.add_argument("--out", default=dense.BACKBONE)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args):
    if not os.path.exists(D.coco_paths(args.data, "val")[0]):
        dense.make_dense(args.data)
    accuracy = pretrain(args.data, args.out, args.epochs, seed=args.seed)
    print(f"wrote {args.out} (val accuracy {accuracy:.3f})")
    return accuracy


if __name__ == "__main__":
    main(get_args_parser().parse_args())

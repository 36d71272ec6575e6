"""The training recipes train.py's --preset chooses from, each in full (§4.1 "Optimization").

    python train.py --data /path/to/coco        # paper: the 1x recipe of §4.1 on COCO
    python train.py                             # quickstart: the shapes set on a CPU, a few minutes
    python train.py --preset dense              # dense: the Table 1 study's recipe (analyze.py ablate)

Each is spelled out key by key rather than derived from another, so that changing one (a faster quick
start) never changes another (the study). The flags of train.py override any value.
"""
import pretrain
import shapes

# §4.1: ResNet-50 with ImageNet weights, SGD, LR 0.01 for 16 images, 500 warmup iterations, LR x0.1 at 60k
# and 80k of 90k iterations, 800-px images (shorter side)
PAPER = dict(arch="resnet50", norm="frozen", freeze_at=2, backbone_weights="imagenet", channels=256, head_norm=None,
             anchor_sizes=[32, 64, 128, 256, 512], min_size=800, max_size=1333, batch_size=16, lr=0.01, iters=90000,
             steps=[60000, 80000], warmup_iters=500, ckpt_every=2000, workers=4, train_split="train2017",
             val_split="val2017", out="runs/retinanet", size_divisible=32)  # see ModelConfig.size_divisible
# From scratch on a CPU: ResNet-18 with trainable BN, 64-channel FPN and GroupNorm heads, 160-px shapes
QUICKSTART = dict(arch="resnet18", norm="bn", freeze_at=0, backbone_weights="none", channels=64, head_norm="gn",
                  anchor_sizes=[16, 32, 64, 128, 256], min_size=160, max_size=160, batch_size=16, lr=0.04, iters=500,
                  steps=[375, 450], warmup_iters=50, ckpt_every=250, workers=1, train_split="train",
                  val_split="val", out="runs/quickstart", size_divisible=32)  # 160 px: 32 saves 2.5x the pixels of 256
# 500 iterations: 0.60 AP in half the time of 1,000 (0.78 AP: --schedule 2 --warmup-iters 100); docs/performance.md
# The dense set (shapes.make_dense): 30 classes among look-alikes, COCO's imbalance (analyze.py ablate). As
# the paper fine-tunes an ImageNet ResNet with frozen BN, a ResNet-18 pretrained on the set's crops (pretrain.py).
# Spelled out, not derived from QUICKSTART: a faster quick start must not change the Table 1 study.
DENSE = dict(arch="resnet18", norm="frozen", freeze_at=2, backbone_weights=pretrain.WEIGHTS, channels=64,
             head_norm="gn", anchor_sizes=[16, 32, 64, 128, 256], min_size=192, max_size=192, batch_size=8, lr=0.04,
             iters=800, steps=[600, 720], warmup_iters=100, ckpt_every=200, workers=1, train_split="train",
             val_split="val", out="runs/dense", size_divisible=32)
PRESETS = {"paper": PAPER, "quickstart": QUICKSTART, "dense": DENSE}
SYNTHETIC = {"quickstart": ("data/shapes", shapes.make_shapes), "dense": ("data/dense", shapes.make_dense)}

"""ResNet backbone for RetinaNet: the C3, C4, C5 feature maps (strides 8, 16, 32), §3.4 and §4.

The paper builds FPN on ResNet-50/101 pre-trained on ImageNet, with batch norm frozen (its
statistics and affine terms become constants) and the stem plus the first residual stage frozen,
as in Detectron (FREEZE_AT = 2). Training from scratch (the CPU quick start) needs trainable batch
norm instead: norm="bn". Under DDP, train.py turns that batch norm into SyncBatchNorm, so that N
processes normalise over the whole batch as one process would.

Module names follow torchvision's ResNet (conv1, bn1, layer1 ... layer4), so an ImageNet or
torchvision detection state dict loads key for key.
"""
import socket

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision import ops
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = {  # name -> (residual block, blocks per stage, torchvision's ImageNet weights, C3/C4/C5 channels)
    "resnet10": (BasicBlock, [1, 1, 1, 1], None, (128, 256, 512)),  # the quick start's: see below
    "resnet18": (BasicBlock, [2, 2, 2, 2], "ResNet18_Weights", (128, 256, 512)),
    "resnet34": (BasicBlock, [3, 4, 6, 3], "ResNet34_Weights", (128, 256, 512)),
    "resnet50": (Bottleneck, [3, 4, 6, 3], "ResNet50_Weights", (512, 1024, 2048)),
    "resnet101": (Bottleneck, [3, 4, 23, 3], "ResNet101_Weights", (512, 1024, 2048)),
    "resnet152": (Bottleneck, [3, 8, 36, 3], "ResNet152_Weights", (512, 1024, 2048)),
}
# resnet10 is ResNet-18 with one block a stage instead of two (the depth of He et al.'s smallest ResNet
# family member, not in the paper or in torchvision's model zoo): the quick start trains from scratch on
# 160-px pictures of four shapes, where the backbone was 80% of an iteration and the second block of each
# stage bought no AP within the quick start's minutes (docs/performance.md). It has no ImageNet weights.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # freeze_at=k freezes the first k


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (the same buffers and float32 arithmetic) that keeps the input's
    dtype, as detectron2's does: under AMP, float16 activations times float32 buffers would otherwise
    promote every BN output, and the ReLUs and residual adds after it, to float32."""

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[:, None, None] + bias.to(x.dtype)[:, None, None]


class _AllReduce(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients: each process's
    input then gets what the losses of all processes ask of it."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm over the batch of all processes (detectron2's NaiveSyncBatchNorm): the mean and the
    variance are all-reduced, differentiably, so N processes with B images each compute what one
    process computes with N*B images, gradients and running statistics included. Unlike
    torch.nn.SyncBatchNorm (CUDA only) it runs on any device, so the gloo tests run it on a CPU.
    Outside DDP or in eval mode it is nn.BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dtype = x.dtype
        x = x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x  # statistics in float32
        # sums and value counts over all processes (their images may differ in size), in one all-reduce
        sums = _AllReduce.apply(torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // x.shape[1])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count  # (C,); two passes: exact where E[x^2] - E[x]^2 is not
        var = _AllReduce.apply((x - mean[:, None, None]).square().sum((0, 2, 3))) / count
        if self.momentum is None:
            raise ValueError("SyncBatchNorm: momentum=None (a cumulative average) is not supported")
        with torch.no_grad():  # as nn.BatchNorm2d: the unbiased variance goes into the running statistic
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp(min=1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * (var + self.eps).rsqrt()
        out = (x - mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]
        return out.to(dtype)


def sync_batch_norm(module):
    """Every trainable nn.BatchNorm2d of module replaced by SyncBatchNorm with its state (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum).to(child.weight)  # device, dtype
            sync.load_state_dict(child.state_dict())
            sync.train(child.training).requires_grad_(child.weight.requires_grad)
            setattr(module, name, sync)
        else:
            sync_batch_norm(child)
    return module


class Backbone(nn.Module):
    """ResNet trunk without its classifier. forward(x (N, 3, H, W)) -> [C3, C4, C5]."""

    def __init__(self, arch="resnet50", norm="frozen", freeze_at=2, weights=None, frozen_bn_eps=1e-5):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if norm not in ("frozen", "bn"):
            raise ValueError(f"norm must be 'frozen' or 'bn', got {norm!r}")
        if not 0 <= freeze_at <= len(STAGES):
            raise ValueError(f"freeze_at must be in 0..{len(STAGES)}, got {freeze_at}")
        block, layers, _, self.out_channels = ARCHS[arch]
        norm_layer = (lambda c: FrozenBatchNorm2d(c, eps=frozen_bn_eps)) if norm == "frozen" else nn.BatchNorm2d
        net = ResNet(block, layers, norm_layer=norm_layer)  # what torchvision.models.resnet50() etc. build
        if weights is not None:
            state = imagenet_state_dict(arch) if weights == "imagenet" else _load_local(weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
            try:
                missing = [k for k in net.load_state_dict(state, strict=False).missing_keys if not k.startswith("fc.")]
            except RuntimeError:  # shapes that do not fit
                missing = ["(tensors of other shapes)"]
            if missing:
                raise ValueError(f"{weights}: not a {arch} state dict (missing {missing[0]})")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for stage in STAGES[:freeze_at]:  # Detectron's FREEZE_AT: no gradient, no batch statistics
            for name in ("conv1", "bn1") if stage == "stem" else (stage,):
                setattr(self, name, _freeze(getattr(self, name)))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4
        c2 = self.layer1(x)
        c3 = self.layer2(c2)  # stride 8
        c4 = self.layer3(c3)  # stride 16
        c5 = self.layer4(c4)  # stride 32
        return [c3, c4, c5]


def _freeze(module):
    """`module` with no trainable parameter: BatchNorm2d becomes FrozenBatchNorm2d (as detectron2)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.load_state_dict(module.state_dict(), strict=False)  # drops num_batches_tracked
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _freeze(child))
    return module.requires_grad_(False)


def fold_batch_norm(module):
    """Fold each batch norm (frozen, or trainable in eval mode: the same affine map of its running
    statistics) into the conv just before it: the same outputs, up to rounding, with two passes less
    over every activation. For inference only: the folded weights are no longer the trained ones."""
    children = list(module.named_children())
    for (name, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, (ops.FrozenBatchNorm2d, nn.BatchNorm2d)):
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                fused.bias.copy_(bn.bias - bn.running_mean * scale + (0 if conv.bias is None else conv.bias * scale))
            setattr(module, name, fused.requires_grad_(False))
            setattr(module, bn_name, nn.Identity())
    for child in module.children():
        fold_batch_norm(child)
    return module


def imagenet_state_dict(arch):
    """torchvision's ImageNet weights for `arch` (downloaded once into the torch hub cache)."""
    if ARCHS[arch][2] is None:
        raise ValueError(f"{arch} has no ImageNet weights: pass a .pth state dict or train from scratch "
                         "(--backbone-weights none --norm bn)")
    url = getattr(torchvision.models, ARCHS[arch][2]).IMAGENET1K_V1.url
    return download_state_dict(url, "fetch that file elsewhere and pass its path (--backbone-weights PATH), "
                                    "or train from scratch (--backbone-weights none --norm bn)")


def download_state_dict(url, alternative):
    """A state dict from torch's hub cache, downloaded once; offline, a one-line RuntimeError."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # fail in seconds, not minutes, when offline
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except OSError as e:  # URLError, timeouts, DNS failures
        raise RuntimeError(f"could not download {url} ({e}); without internet, {alternative}") from None
    finally:
        socket.setdefaulttimeout(old)


def _load_local(path):
    """A state dict from a local .pth: plain, or under 'model' / 'state_dict' as training scripts save."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch state dict ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a PyTorch state dict")
    return state

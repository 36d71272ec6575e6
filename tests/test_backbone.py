"""backbone.py: C3-C5 against torchvision's ResNet, freezing, and weight loading with bad files."""
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import model as M
from backbone import Backbone
from conftest import ROOT


def test_c3_c4_c5_equal_torchvision_resnet_with_the_same_local_weights(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    ours = Backbone("resnet50", norm="frozen", weights=str(path)).eval()
    x = torch.randn(1, 3, 100, 131)
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        c3 = net.layer2(net.layer1(y))
        c4 = net.layer3(c3)
        c5 = net.layer4(c4)
        for a, b in zip(ours(x), (c3, c4, c5)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,channels", [("resnet10", (128, 256, 512)), ("resnet18", (128, 256, 512)),
                                           ("resnet50", (512, 1024, 2048))])
def test_strides_8_16_32_and_channels(arch, channels):
    c3, c4, c5 = Backbone(arch, norm="bn")(torch.randn(1, 3, 100, 131))
    assert [c.shape[1] for c in (c3, c4, c5)] == list(channels)
    assert [tuple(c.shape[-2:]) for c in (c3, c4, c5)] == [(13, 17), (7, 9), (4, 5)]  # ceil(H / stride)


def trainable(module):
    return any(p.requires_grad for p in module.parameters())


def test_freeze_at_two_freezes_stem_and_res2_as_detectron():
    b = Backbone("resnet18", norm="frozen", freeze_at=2)
    assert not trainable(b.conv1) and not trainable(b.layer1)
    assert trainable(b.layer2) and trainable(b.layer4)
    assert all(isinstance(m, FrozenBatchNorm2d) for m in b.modules() if "BatchNorm" in type(m).__name__)
    assert not trainable(Backbone("resnet18", freeze_at=5))
    assert trainable(Backbone("resnet18", norm="bn", freeze_at=0).conv1)


def test_trainable_bn_only_outside_the_frozen_stages():
    b = Backbone("resnet18", norm="bn", freeze_at=2)
    assert isinstance(b.bn1, FrozenBatchNorm2d) and isinstance(b.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(b.layer2[0].bn1, nn.BatchNorm2d) and b.layer2[0].bn1.weight.requires_grad


def test_imagenet_weights_offline_fail_in_one_line_naming_the_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--backbone-weights PATH") as e:
        Backbone("resnet18", weights="imagenet")
    assert "\n" not in str(e.value) and "resnet18-f37072fd.pth" in str(e.value)


def test_bad_weight_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth: no such file"):
        Backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a PyTorch state dict"):
        Backbone("resnet18", weights=str(text))
    r18 = tmp_path / "r18.pth"
    torch.save({"model": torchvision.models.resnet18().state_dict()}, r18)
    Backbone("resnet18", weights=str(r18))  # a state dict under "model" loads
    with pytest.raises(ValueError, match="r18.pth: not a resnet50 state dict"):
        Backbone("resnet50", weights=str(r18))


def test_resnet10_is_resnet18_with_one_block_a_stage_under_the_same_names():
    """The quick start's backbone: a ResNet-18 state dict's first block of each stage, stem and all, loads into it
    key for key (torchvision's names), and it has no ImageNet weights to download."""
    r18 = torchvision.models.resnet18().state_dict()
    ours = Backbone("resnet10", norm="bn", freeze_at=0)
    assert [len(getattr(ours, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    kept = {k: v for k, v in r18.items() if not k.startswith("fc.") and k.split(".")[1:2] != ["1"]}  # layerN.1.*
    assert set(ours.state_dict()) == set(kept)
    ours.load_state_dict(kept)
    with pytest.raises(ValueError, match="resnet10 has no ImageNet weights"):
        Backbone("resnet10", weights="imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        Backbone("vgg16")
    with pytest.raises(ValueError, match="norm must be"):
        Backbone("resnet18", norm="gn")


def test_frozen_bn_keeps_the_activation_dtype_under_autocast_and_equals_torchvision_in_float32():
    b = Backbone("resnet18", norm="frozen", freeze_at=0).eval()
    for m in b.modules():
        if isinstance(m, FrozenBatchNorm2d):  # statistics a trained network has
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    dtypes = []
    for m in b.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c3, c4, c5 = b(torch.randn(1, 3, 64, 64))
    assert len(dtypes) == 20 and set(dtypes) == {torch.bfloat16} and c5.dtype == torch.bfloat16
    ours = b.layer1[0].bn1
    tv = FrozenBatchNorm2d(64, eps=ours.eps)  # torchvision's: its float32 buffers promote bfloat16 to float32
    tv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 9, 9)
    assert torch.equal(ours(x), tv(x))
    assert tv(x.bfloat16()).dtype == torch.float32 and ours(x.bfloat16()).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def sync_bn_run(tmp_path_factory):
    """sync_bn_worker.py run once by torchrun with 2 gloo processes: the folder of their rank{0,1}.pt."""
    out = tmp_path_factory.mktemp("sync_bn")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           os.path.join(ROOT, "tests", "sync_bn_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sync_batch_norm_over_two_processes_equals_batch_norm_over_the_whole_batch(sync_bn_run):
    # float64, so that the comparison is exact up to rounding (64 channels: with 32, GroupNorm(32) has one
    # channel a group and 1e-12 at the input moves the gradients by 1e-3): gradients of every parameter and the
    # running statistics of 2 ranks x 2 images equal those of one process with the 4 images
    torch.manual_seed(0)
    cfg = M.ModelConfig(num_classes=3, arch="resnet18", norm="bn", freeze_at=0, channels=64, head_norm="gn")
    net = M.RetinaNet(cfg).double()
    out = net(torch.randn(4, 3, 64, 64, dtype=torch.float64))
    (sum(o.square().sum() for o in out) / 2).backward()
    for rank in (0, 1):
        got = torch.load(sync_bn_run / f"rank{rank}.pt", weights_only=True)
        for n, p in net.named_parameters():
            assert (got["grads"][n] - p.grad).norm() <= 1e-9 * p.grad.norm(), n  # measured: ~1e-11
        for n, b in net.named_buffers():
            assert (got["buffers"][n] - b).float().norm() <= 1e-9 * b.float().norm(), n


def test_sync_batch_norm_over_images_of_different_sizes_uses_every_value_once(sync_bn_run):
    """The second half of sync_bn_worker.py: one layer, rank 0 with (2, 3, 5, 7), rank 1 with (1, 3, 6, 4)
    inputs. Oracle: batch norm written out over the values of both, gradients by autograd."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((2, 3, 5, 7), (1, 3, 6, 4))]
    ws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    xs = [x.requires_grad_() for x in xs]
    values = torch.cat([x.transpose(0, 1).reshape(3, -1) for x in xs], 1)  # (C, all values)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    ys = [(x - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt() for x in xs]
    sum((y * w).sum() for y, w in zip(ys, ws)).backward()
    n = values.shape[1]
    for rank in (0, 1):
        got = torch.load(sync_bn_run / f"rank{rank}.pt", weights_only=True)["sizes"]
        torch.testing.assert_close(got["y"], ys[rank].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["x_grad"], xs[rank].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["running_mean"], 0.1 * mean.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["running_var"], 0.9 + 0.1 * var.detach() * n / (n - 1), rtol=1e-10, atol=1e-12)

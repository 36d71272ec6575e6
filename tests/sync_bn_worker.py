"""Started by torchrun from test_backbone.py: each of 2 ranks runs half a float64 batch through a
SyncBatchNorm RetinaNet under DDP and saves its gradients and running statistics."""
import os
import sys

import torch
from torch import nn

import backbone as B
import model as M

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    cfg = M.ModelConfig(num_classes=3, arch="resnet18", norm="bn", freeze_at=0, channels=64, head_norm="gn")
    net = B.sync_batch_norm(M.RetinaNet(cfg).double())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)[2 * rank:2 * rank + 2]  # this rank's half
    ddp = nn.parallel.DistributedDataParallel(net)  # kept alive: its reducer averages the gradients
    sum(o.square().sum() for o in ddp(x)).backward()  # the mean over ranks of d(sum of 2 images)/dw
    # one layer, the ranks' images of different sizes (as COCO batches are): statistics over all their values
    bn = B.sync_batch_norm(nn.Sequential(nn.BatchNorm2d(3))).double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((2, 3, 5, 7), (1, 3, 6, 4))]
    ws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    x = xs[rank].requires_grad_()
    y = bn(x)
    (y * ws[rank]).sum().backward()
    torch.save({"grads": {n: p.grad for n, p in net.named_parameters()}, "buffers": dict(net.named_buffers()),
                "sizes": {"y": y.detach(), "x_grad": x.grad, "running_mean": bn[0].running_mean,
                          "running_var": bn[0].running_var}}, os.path.join(sys.argv[1], f"rank{rank}.pt"))

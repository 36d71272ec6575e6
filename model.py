"""RetinaNet, assembled: ResNet + FPN + class and box subnets (§4 "RetinaNet Detector", Fig. 3),
and its inference (§4 "Inference").

`RetinaNet(cfg).forward(images)` maps a normalised, padded batch (N, 3, H, W) to raw outputs
(cls_logits (N, R, K), box_deltas (N, R, 4)), the same in train and eval mode. Everything else is a
plain function beside it: `preprocess` (resize_image, normalise, pad), `make_anchors`, `postprocess`
(threshold, top-k, decode, NMS, with its own InferenceConfig), `detect` (all of it for a list of
images). Losses live in loss.py; loading a checkpoint, this project's, torchvision's or an exported
ONNX file, in weights.py.

Shape legend: N images, R anchors, K classes, M boxes, A anchors per location (9).
"""
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, clip_boxes_to_image

import anchors as A
from backbone import Backbone, fold_batch_norm
from fpn import FPN
from heads import Head


@dataclass
class ModelConfig:
    """The network and its input: every hyperparameter a model rebuilds from (nanoGPT's model_args), its classes
    and test scale, saved in checkpoints. The loss's settings are loss.LossConfig, inference's InferenceConfig."""

    num_classes: int = 80
    class_names: tuple = ()  # label -> name, for infer.py and app.py
    category_ids: tuple = ()  # label -> the dataset's category id, for COCO results
    # backbone and FPN (§3.4, §4)
    arch: str = "resnet50"
    norm: str = "frozen"  # "frozen" (paper, with ImageNet weights) or "bn" (training from scratch)
    freeze_at: int = 2  # stem + res2, as Detectron
    frozen_bn_eps: float = 1e-5
    channels: int = 256  # FPN and head width C
    p6_from: str = "c5"  # paper; torchvision v1 uses "p5"
    # subnets (§4, §4.1)
    num_convs: int = 4
    head_norm: str | None = None  # None (paper) or "gn" (torchvision v2)
    prior: float = 0.01  # pi of §3.3
    # anchors (§4 "Anchors")
    anchor_sizes: tuple = A.SIZES
    anchor_scales: tuple = A.SCALES
    anchor_ratios: tuple = A.RATIOS
    anchor_offset: float = 0.0
    round_anchors: bool = False  # torchvision's integer anchors (from_torchvision turns it on)
    # input (torchvision's ImageNet normalisation, RGB in [0, 1]; Detectron used BGR Caffe2 weights)
    min_size: int = 800
    max_size: int = 1333
    # Detectron pads to P7's stride, 128; ceil-sized grids (anchors.py) fit any size and the top-down 2x
    # upsampling needs only P5's 32, as torchvision pads (docs/departures.md).
    size_divisible: int = 32
    pixel_mean: tuple = (0.485, 0.456, 0.406)
    pixel_std: tuple = (0.229, 0.224, 0.225)

    @property
    def num_anchors(self):
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @classmethod
    def from_dict(cls, d):
        """The inverse of dataclasses.asdict, which checkpoints store."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class InferenceConfig:
    """The settings of postprocess (§4 "Inference"), saved in checkpoints; a model carries them as `inference`,
    as torchvision's RetinaNet carries its score_thresh and nms_thresh."""

    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per level
    nms_thresh: float = 0.5
    max_detections: int = 100


class RetinaNet(nn.Module):
    """forward(images (N, 3, H, W)) -> (cls_logits (N, R, K), box_deltas (N, R, 4))."""

    def __init__(self, cfg: ModelConfig, backbone_weights=None, inference=None):
        super().__init__()
        if len(cfg.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes: one size for each of P3-P7, got {cfg.anchor_sizes}")
        self.cfg, self.inference = cfg, inference or InferenceConfig()
        self.backbone = Backbone(cfg.arch, cfg.norm, cfg.freeze_at, backbone_weights, cfg.frozen_bn_eps)
        self.fpn = FPN(self.backbone.out_channels, cfg.channels, cfg.p6_from)
        self.cls_head = Head(cfg.channels, cfg.num_classes, cfg.num_anchors, cfg.num_convs, cfg.head_norm, cfg.prior)
        self.box_head = Head(cfg.channels, 4, cfg.num_anchors, cfg.num_convs, cfg.head_norm)

    def forward(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        if self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)  # the layout of the weights
        features = self.fpn(self.backbone(images))  # [P3 ... P7]
        return self.cls_head(features), self.box_head(features)

    def for_inference(self):
        """Batch norm folded into the convs, channels-last weights: faster on a CPU (docs/performance.md); for
        detection only."""
        fold_batch_norm(self.backbone)
        return self.to(memory_format=torch.channels_last).eval()


def preprocess(images, cfg, resize=True):
    """List of (3, H_i, W_i) images (uint8, or float in [0, 1]) -> normalised batch and sizes.

    Resizes the shorter side to cfg.min_size (longer side at most cfg.max_size) as torchvision
    does, normalises, and pads with zeros to a multiple of cfg.size_divisible.
    Returns (batch (N, 3, H, W), [(h_i, w_i)] sizes after resizing, before padding).
    """
    out = []
    for i, img in enumerate(images):
        if not torch.is_tensor(img) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
        img = normalize(img, cfg)
        out.append(resize_image(img, cfg) if resize else img)
    sizes, d = [tuple(img.shape[-2:]) for img in out], cfg.size_divisible
    H, W = (math.ceil(max(size[k] for size in sizes) / d) * d for k in (0, 1))
    batch = out[0].new_zeros(len(out), 3, H, W)
    for b, img in zip(batch, out):
        b[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch, sizes


def resize_image(image, cfg):
    """(3, H, W) float -> shorter side cfg.min_size, longer at most cfg.max_size, as torchvision resizes."""
    scale = min(cfg.min_size / min(image.shape[-2:]), cfg.max_size / max(image.shape[-2:]))
    size = [max(1, int(s * scale)) for s in image.shape[-2:]]  # torchvision's floor, and a 1x1000 image stays 1 high
    return F.interpolate(image[None], size=size, mode="bilinear")[0]


def normalize(images, cfg):
    """uint8 (0-255) or float (0-1) images (..., 3, H, W) -> float, normalised with cfg's mean and std."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean, std = (torch.tensor(v, device=images.device)[:, None, None] for v in (cfg.pixel_mean, cfg.pixel_std))
    return (images - mean) / std


def make_anchors(cfg, image_size, device=None):
    """Anchors of a padded (H, W) input and the number of anchors on each level: (R, 4), [R_l]."""
    strides = [2**level for level in range(3, 3 + len(cfg.anchor_sizes))]  # P3, P4, ...
    anchors = A.generate_anchors(image_size, cfg.anchor_sizes, strides, cfg.anchor_scales, cfg.anchor_ratios,
                                 cfg.anchor_offset, cfg.round_anchors, device)
    per_level = [math.ceil(image_size[0] / s) * math.ceil(image_size[1] / s) * cfg.num_anchors for s in strides]
    return anchors, per_level


def postprocess(cls_logits, box_deltas, anchors, per_level, image_sizes, original_sizes=None, inference=None):
    """Raw outputs -> detections per image (§4 "Inference"), with `inference`'s settings (an InferenceConfig,
    default the paper's).

    Per level: keep scores > score_thresh, at most topk_candidates over anchor x class, decode and clip
    to the image. Then class-wise NMS at nms_thresh and the best max_detections. Boxes come back in
    original_sizes coordinates (or those of image_sizes when it is None).
    Returns a list of {"boxes" (D, 4), "scores" (D,), "labels" (D,)}.
    """
    settings = inference or InferenceConfig()
    if not 0 <= settings.score_thresh <= 1:
        raise ValueError(f"score threshold must be in [0, 1], got {settings.score_thresh}")
    K, t = cls_logits.shape[-1], settings.score_thresh
    # score > t  <=>  logit > log(t / (1 - t)): the threshold costs no sigmoid over all R x K scores
    logit_thresh = -math.inf if t == 0 else math.inf if t == 1 else math.log(t / (1 - t))
    results = []
    for n, size in enumerate(image_sizes):
        boxes, scores, labels = [], [], []
        for logits, deltas, anc in zip(cls_logits[n].split(per_level), box_deltas[n].split(per_level),
                                       anchors.split(per_level)):
            flat = logits.flatten()  # (R_l, K) -> (R_l * K,)
            idx = (flat > logit_thresh).nonzero().squeeze(1)
            scored, order = flat[idx].sigmoid().topk(min(settings.topk_candidates, idx.numel()))
            idx = idx[order]
            a = idx // K  # anchor index within the level
            boxes.append(clip_boxes_to_image(A.decode(anc[a], deltas[a]), size))
            scores.append(scored)
            labels.append(idx % K)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes, scores, labels, settings.nms_thresh)[: settings.max_detections]
        boxes = boxes[keep]
        if original_sizes is not None:  # back to the input image's pixels
            (h0, w0), (h, w) = original_sizes[n], size
            boxes = boxes * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], device=boxes.device)
        results.append({"boxes": boxes, "scores": scores[keep], "labels": labels[keep]})
    return results


def model_device(model):
    """Where the model's weights are; the CPU for a model without parameters (weights.OnnxRetinaNet)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def native_bfloat16():
    """What computes bfloat16 natively for this process's CPU ('AMX' or 'AVX512-BF16'), or None. There,
    bfloat16 autocast is 1.4-2.7x faster than float32; elsewhere oneDNN emulates it, up to 14x slower
    (docs/performance.md). The CPU's flags alone do not say it: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA
    can keep a process below what its CPU has, so the process's own capabilities are asked too."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell here, so float32
        return None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if (torch.backends.cpu.get_cpu_capability() != "AVX512" or not torch.ops.mkldnn._is_mkldnn_bf16_supported()
            or cap not in ("ALL", "DEFAULT") and not any(s in cap for s in ("BF16", "FP16", "AMX", "AVX10"))):
        return None
    if "amx_bf16" in flags and (cap in ("ALL", "DEFAULT") or "AMX" in cap):
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def amp_dtype(device):
    """Autocast's lower precision on a device: float16 on CUDA (with a loss scaler in training), bfloat16 on a
    CPU (float32's exponent range: no scaler)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast_choice(amp, device):
    """The --amp flag of train.py, infer.py and app.py ('auto', 'on' or 'off') on a device, as (autocast dtype
    or None, a line saying why). on: amp_dtype; auto: bfloat16 on a CPU that computes it natively, float32
    elsewhere (CUDA included: the paper's runs are float32 unless asked)."""
    name = "float16" if device.type == "cuda" else "bfloat16"
    if amp == "on":
        return amp_dtype(device), f"{name} autocast: on (--amp on)"
    unit = native_bfloat16() if amp == "auto" and device.type == "cpu" else None
    if unit:
        return torch.bfloat16, f"bfloat16 autocast: on ({unit}; --amp off for float32)"
    why = "--amp off" if amp == "off" else "not native here; --amp on forces it"
    return None, f"{name} autocast: off ({why})"


@torch.inference_mode()
def detect(model, images, score_thresh=None, amp=False):
    """Detections for a list of (3, H_i, W_i) images of any sizes, in their own pixel coordinates, with the
    model's InferenceConfig (its score threshold replaced by score_thresh, when given). amp: the network
    under autocast (amp_dtype), its outputs decoded in float32.

    Each image is padded on its own and batched only with images of the same padded size: no pixel
    is spent on another image's padding, and an image's detections never depend on its companions.
    """
    cfg, device, was_training = model.cfg, model_device(model), model.training
    settings = model.inference if score_thresh is None else replace(model.inference, score_thresh=score_thresh)
    model.eval()
    singles = [preprocess([img.to(device)], cfg) for img in images]  # [((1, 3, H, W), [(h, w)])]
    groups = {}
    for i, (x, _) in enumerate(singles):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    results = [None] * len(images)
    for shape, members in groups.items():
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            cls_logits, box_deltas = model(torch.cat([singles[i][0] for i in members]))
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        anchors, per_level = make_anchors(cfg, shape, device)
        detections = postprocess(cls_logits, box_deltas, anchors, per_level, [singles[i][1][0] for i in members],
                                 [images[i].shape[-2:] for i in members], settings)
        for i, det in zip(members, detections):
            results[i] = det
    model.train(was_training)
    return results

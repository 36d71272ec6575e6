"""Weights for the detector: this project's checkpoints (train.py's) and torchvision's COCO RetinaNets.

`load_checkpoint(path)` rebuilds a trained model from the ModelConfig its checkpoint carries, so infer.py
needs no flags; `load_checkpoint("torchvision")` (or "torchvision-v2") downloads torchvision's
retinanet_resnet50_fpn (36.4 COCO AP) or its v2 (41.5) once and converts it: `from_torchvision` renames
torchvision's state-dict keys to ours (`torchvision_key`) and `torchvision_config` states where
torchvision departs from the paper (v1 takes P6 from P5; the paper from C5). Checkpoints are read with
weights_only=True: a file cannot run code.
"""
import json
import os
import re

import torch

from backbone import download_state_dict
from model import ModelConfig, RetinaNet

# torchvision key -> ours. Old torchvision files (the v1 COCO weights) name the FPN convs without
# the ".0." and the head convs conv.0, conv.2, ...; both forms are accepted.
_TV_KEYS = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.(0\.)?", r"fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.(0\.)?", r"fpn.output.\1."),
    (r"^backbone\.fpn\.extra_blocks\.", "fpn."),
    (r"^head\.classification_head\.conv\.(\d)\.(\d)\.", r"cls_head.tower.\1.\2."),
    (r"^head\.classification_head\.conv\.(\d)\.", lambda m: f"cls_head.tower.{int(m[1]) // 2}.0."),
    (r"^head\.classification_head\.cls_logits\.", "cls_head.out."),
    (r"^head\.regression_head\.conv\.(\d)\.(\d)\.", r"box_head.tower.\1.\2."),
    (r"^head\.regression_head\.conv\.(\d)\.", lambda m: f"box_head.tower.{int(m[1]) // 2}.0."),
    (r"^head\.regression_head\.bbox_reg\.", "box_head.out."),
]


def torchvision_config(version=1, num_classes=91, class_names=()):
    """The ModelConfig of torchvision's retinanet_resnet50_fpn (v1) or retinanet_resnet50_fpn_v2."""
    if version not in (1, 2):
        raise ValueError(f"torchvision RetinaNet version must be 1 or 2, got {version!r}")
    return ModelConfig(
        num_classes=num_classes, class_names=tuple(class_names), arch="resnet50", norm="frozen", round_anchors=True,
        # v1: P6 from P5 and its COCO weights were trained with batch-norm eps 0 (torchvision's overwrite_eps)
        p6_from="p5" if version == 1 else "c5", frozen_bn_eps=0.0 if version == 1 else 1e-5,
        head_norm=None if version == 1 else "gn", box_loss="l1" if version == 1 else "giou", size_divisible=32,
    )


def torchvision_key(key):
    """Our name for a torchvision RetinaNet state-dict key, or None for a key we have no use for."""
    for pattern, repl in _TV_KEYS:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def from_torchvision(state_dict, version=1, class_names=()):
    """A RetinaNet holding the weights of torchvision's retinanet_resnet50_fpn (version=1, 36.4 COCO AP)
    or retinanet_resnet50_fpn_v2 (version=2, 41.5 AP), given their state dict."""
    ours = {new: v for k, v in state_dict.items() if (new := torchvision_key(k))}
    if "cls_head.out.weight" not in ours:
        raise ValueError("not a torchvision RetinaNet state dict (no head.classification_head.cls_logits)")
    model = RetinaNet(torchvision_config(version, ours["cls_head.out.weight"].shape[0] // 9, class_names))
    model.load_state_dict(ours, strict=True)
    return model


def load_checkpoint(path, device="cpu"):
    """The model of a checkpoint written by train.py (its ModelConfig rebuilds it), in eval mode;
    path 'torchvision' or 'torchvision-v2' gives torchvision's COCO model (load_torchvision), a .onnx
    file written by export.py the network run by ONNX Runtime (OnnxRetinaNet, CPU)."""
    if path in ("torchvision", "torchvision-v2"):
        return load_torchvision(2 if path.endswith("v2") else 1).to(device)
    if str(path).endswith(".onnx"):
        if torch.device(device).type != "cpu":
            raise ValueError(f"{path}: ONNX models run on ONNX Runtime's CPU provider here, not on {device}")
        return OnnxRetinaNet(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a truncated file, a text file, a pickle with code in it
        raise ValueError(f"{path}: not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this project (no 'config' and 'model' entries)")
    model = RetinaNet(ModelConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit its config ({str(e).splitlines()[1].strip()[:120]})") from None
    return model.to(device).eval()


def load_torchvision(version=1):
    """torchvision's COCO-trained RetinaNet (downloaded once), converted: 91 outputs indexed by COCO
    category id, named with torchvision's category list."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

    weights = (RetinaNet_ResNet50_FPN_Weights if version == 1 else RetinaNet_ResNet50_FPN_V2_Weights).COCO_V1
    names = weights.meta["categories"]
    model = from_torchvision(download_state_dict(weights.url, "use a checkpoint of this project (--weights PATH)"),
                             version, class_names=names)
    model.cfg.category_ids = tuple(range(len(names)))  # torchvision's label is the COCO category id
    return model.eval()


ONNX_CONFIG_KEY = "retinanet_config"  # export.py writes the ModelConfig as JSON under this metadata key


class OnnxRetinaNet(torch.nn.Module):
    """An ONNX file of export.py run by ONNX Runtime's CPU provider in RetinaNet's place: the same
    forward(images (N, 3, H, W)) -> (cls_logits (N, R, K), box_deltas (N, R, 4)) and cfg, so that
    model.detect, evaluate and infer.py run it unchanged. It has no parameters: model.detect then
    keeps the tensors on the CPU. threads: ONNX Runtime's intra-op threads (default PyTorch's count)."""

    def __init__(self, path, threads=None):
        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such ONNX file")
        try:
            import onnxruntime as ort  # only running ONNX files needs it
        except ImportError:
            raise ValueError(f"{path}: running ONNX needs onnxruntime (pip install -r requirements.txt)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # not protobuf, a truncated file, an unknown op
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_CONFIG_KEY not in meta:
            raise ValueError(f"{path}: an ONNX model without this project's metadata (no '{ONNX_CONFIG_KEY}'); "
                             f"write it with export.py")
        try:
            self.cfg, self.path = ModelConfig.from_dict(json.loads(meta[ONNX_CONFIG_KEY])), path
        except (ValueError, TypeError) as e:  # not JSON, or a config of another version of this project
            raise ValueError(f"{path}: its {ONNX_CONFIG_KEY!r} metadata is no config of this project ({e})") from None
        self.threads = options.intra_op_num_threads
        self.input = self.session.get_inputs()[0].name

    def forward(self, images):
        batch = images.detach().float().cpu().contiguous().numpy()  # (N, 3, H, W) NCHW, as exported
        cls_logits, box_deltas = self.session.run(None, {self.input: batch})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)

    def for_inference(self):
        return self.eval()

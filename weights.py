"""Saving and loading weights: train.py's checkpoints, torchvision's COCO RetinaNets, export.py's ONNX files.

A checkpoint holds everything a run needs to continue (model, optimizer, scheduler, AMP scaler,
iteration, RNG states, arguments) and the three configs that rebuild and use the model: ModelConfig
(the network), LossConfig (the loss it trained with) and InferenceConfig (§4 "Inference"). It is
written to a temporary name and renamed, and never with non-finite weights (check_finite). On a CPU,
`train.py --resume` continues bit for bit (restore); on CUDA only with --deterministic (see README).

`load_checkpoint(path)` rebuilds a trained model from its checkpoint, so infer.py needs no flags;
`load_checkpoint("torchvision")` (or "torchvision-v2") downloads torchvision's retinanet_resnet50_fpn
(36.4 COCO AP) or its v2 (41.5) once and converts it: `from_torchvision` renames torchvision's
state-dict keys to ours (`torchvision_key`) and `torchvision_config` states where torchvision departs
from the paper (v1 takes P6 from P5; the paper from C5). Checkpoints are read with weights_only=True:
a file cannot run code.
"""
import dataclasses
import json
import os
import re

import torch

import data as D
from backbone import download_state_dict
from loss import LossConfig
from model import InferenceConfig, ModelConfig, RetinaNet


def save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, loss_cfg, run_args=None, evaluation=None):
    """Everything a run needs to continue, written to a temporary name and renamed: never half-written.
    run_args: the run's settings as a dict (train.py's flags), kept for the record; evaluation: the COCO numbers
    of these weights, if evaluated (best.pt)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration, "args": run_args or {}, "eval": evaluation,
             **config_entries(model.cfg, model.inference, loss_cfg),
             "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}
    D.write_atomic(path, lambda tmp: torch.save(state, tmp))


def config_entries(cfg, inference, loss_cfg=None):
    """The configs as a checkpoint stores them, and export.py's ONNX metadata (no loss_cfg: a file for inference)."""
    entries = {"config": dataclasses.asdict(cfg), "inference": dataclasses.asdict(inference)}
    return entries if loss_cfg is None else {**entries, "loss": dataclasses.asdict(loss_cfg)}


def read_configs(entries):
    """(ModelConfig, LossConfig, InferenceConfig) of a checkpoint's entries ("config", "loss", "inference").
    Checkpoints and ONNX files written before the three were apart (issue 33) hold one flat dict of all their
    fields, under "config" (or as the whole ONNX metadata): each config takes its own fields from it.
    TypeError on a field none of them has."""
    if "loss" not in entries and "inference" not in entries:  # the flat form of earlier checkpoints
        flat = entries.get("config", entries)
        fields = [{f.name for f in dataclasses.fields(c)} for c in (ModelConfig, LossConfig, InferenceConfig)]
        unknown = set(flat) - set().union(*fields)
        if unknown:
            raise TypeError(f"unknown config fields {sorted(unknown)}")
        entries = {key: {k: v for k, v in flat.items() if k in names}
                   for key, names in zip(("config", "loss", "inference"), fields)}
    return (ModelConfig.from_dict(entries["config"]), LossConfig(**entries.get("loss", {})),
            InferenceConfig(**entries.get("inference", {})))


def check_finite(model, iteration, last_good):
    """FloatingPointError unless every weight is finite: a checkpoint is never written with NaN weights."""
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad:
        raise FloatingPointError(f"iteration {iteration}: {bad} is not finite; stopped. Last good checkpoint: "
                                 f"{last_good or 'none written yet'}")


def restore(path, model, optimizer, scheduler, scaler, device):
    """Load a run's checkpoint into its model, optimizer, scheduler, scaler and RNGs; returns its iteration.
    Read onto the CPU (the RNG states must stay CPU tensors), then each part copies to its device."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # moves the momentum buffers to the parameters' device
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt["scaler"]:  # a run without AMP saved an empty scaler state
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        print(f"{path}: no AMP loss scale saved (a float32 run); starting from the default scale")
    torch.set_rng_state(ckpt["rng"]["torch"])
    index = (torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else -1
    if 0 <= index < len(ckpt["rng"]["cuda"]):
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][index], index)
    return ckpt["iteration"]

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
        head_norm=None if version == 1 else "gn", size_divisible=32,
    )


def torchvision_loss(version=1):
    """The loss torchvision's RetinaNet trains with, as a LossConfig: the paper's but its box loss, L1 (v1, as
    detectron2) or GIoU on decoded boxes (v2)."""
    return LossConfig(box_loss="l1" if version == 1 else "giou")


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
    try:
        cfg, _, inference = read_configs(ckpt)
    except TypeError as e:  # a checkpoint of another version of this project
        raise ValueError(f"{path}: its configs are not this project's ({e})") from None
    model = RetinaNet(cfg, inference=inference)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit its config ({str(e).splitlines()[1].strip()[:120]})") from None
    return model.to(device).eval()


def load_for_finetune(path, class_names, category_ids, prior, min_size, max_size, anchor_sizes=None,
                      anchor_ratios=None, anchor_scales=None):
    """load_checkpoint's model made ready for another dataset (train.py --finetune): its classes and scale, and the
    anchors given (None: the checkpoint's). New classes get a new class output layer with the prior's bias (§3.3);
    another number of anchors a location, new output layers in both subnets; the rest of the network is kept."""
    model = load_checkpoint(path)
    cfg, classes_before = model.cfg, model.cfg.num_classes
    cfg.num_classes, cfg.class_names, cfg.category_ids = len(class_names), tuple(class_names), tuple(category_ids)
    cfg.min_size, cfg.max_size = min_size, max_size
    for key, value in (("anchor_sizes", anchor_sizes), ("anchor_ratios", anchor_ratios), ("anchor_scales",
                                                                                          anchor_scales)):
        if value:  # other shapes keep the output layers: each output learns its anchor's deltas anew
            setattr(cfg, key, tuple(value))
    new_anchors = cfg.num_anchors != model.box_head.num_anchors
    model.cls_head.num_anchors = model.box_head.num_anchors = cfg.num_anchors
    if new_anchors or cfg.num_classes != classes_before:
        model.cls_head.reset_output(cfg.num_classes, prior)
    if new_anchors:
        model.box_head.reset_output(4)
    return model


def load_loss_config(path):
    """The LossConfig a checkpoint trained with (its anchor assignment: analyze.py and app.py assign as training
    did): torchvision's (torchvision_loss) for its weights, the paper's for ONNX files, which carry none."""
    if path in ("torchvision", "torchvision-v2"):
        return torchvision_loss(2 if path.endswith("v2") else 1)
    if str(path).endswith(".onnx"):
        return LossConfig()
    try:  # memory-mapped: only the small config entries are read, not the weights and optimizer state
        return read_configs(torch.load(path, map_location="cpu", weights_only=True, mmap=True))[1]
    except Exception as e:  # as load_checkpoint: a missing, truncated or foreign file in one line
        raise ValueError(f"{path}: no loss settings of a checkpoint of this project ({type(e).__name__})") from None


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


ONNX_CONFIG_KEY = "retinanet_config"  # export.py writes config_entries (network, inference) as JSON under this key


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
            self.cfg, _, self.inference = read_configs(json.loads(meta[ONNX_CONFIG_KEY]))
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # not JSON, or another version's config
            raise ValueError(f"{path}: its {ONNX_CONFIG_KEY!r} metadata is no config of this project ({e})") from None
        self.threads, self.path = options.intra_op_num_threads, path
        self.input = self.session.get_inputs()[0].name

    def forward(self, images):
        batch = images.detach().float().cpu().contiguous().numpy()  # (N, 3, H, W) NCHW, as exported
        cls_logits, box_deltas = self.session.run(None, {self.input: batch})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)

    def for_inference(self):
        return self.eval()

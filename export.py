"""Export a trained RetinaNet for deployment: an ONNX model for ONNX Runtime and a torch.export program.

    python export.py                                       # the quick start's checkpoint -> runs/export/
    python export.py --weights torchvision                 # torchvision's COCO RetinaNet (downloaded once)
    python export.py --weights runs/retinanet/checkpoint.pt --out model.onnx
    python infer.py photo.jpg --weights runs/export/retinanet.onnx    # run by ONNX Runtime, same output

What is exported is the network, RetinaNet.forward, as infer.py runs it (batch norm folded): a
normalised, padded batch (N, 3, H, W) to the raw outputs of every level, cls_logits (N, R, K) and
box_deltas (N, R, 4), anchors ordered level, y, x, anchor (§4 "RetinaNet Detector"). N is dynamic,
and so are H and W in multiples of the checkpoint's size_divisible (32), as model.preprocess pads.
The inference around it (§4 "Inference": resize, normalise, pad; threshold, per-level top-k, decode,
class-wise NMS) stays the project's one Python code, model.detect, for either engine: its steps
have data-dependent sizes (the scores above 0.05, top-k of those), which torch.export can trace only
as unbacked sizes, and in the graph they would be a second copy of model.postprocess to keep equal.

The checkpoint's ModelConfig (classes, category ids, test scale, anchors) and InferenceConfig (score
threshold, top-k, NMS) go into the ONNX file's metadata under "retinanet_config", so the file alone is
enough: weights.load_checkpoint reads it back (and the single config of the files written before issue
33). Both files are written under a temporary name and renamed.
"""
import argparse
import json
import os
import warnings

import torch

import data as D
import infer
import weights as W

DEFAULT_OUT = "runs/export/retinanet.onnx"


MIN_SIDE = 160  # P7 (stride 128) at least 2x2: torch.export specialises a size of 1 (broadcasting) into the graph


def example_batch(cfg, n=2):
    """A padded batch of the checkpoint's test scale, at least MIN_SIDE: what the exporters trace with."""
    d = cfg.size_divisible
    return torch.randn(n, 3, *(max(MIN_SIDE, -(-s // d) * d) for s in (cfg.min_size, cfg.max_size)))


def dynamic_shapes(cfg):
    """N free; H and W any multiple of size_divisible (the FPN's 2x upsampling needs P5's stride) from MIN_SIDE
    up (the .pt2 program checks it; the ONNX graph has no such check and runs smaller inputs too, tested)."""
    d = cfg.size_divisible
    side = {k: d * torch.export.Dim(k, min=-(-MIN_SIDE // d), max=8192 // d) for k in ("h", "w")}
    return {"images": {0: torch.export.Dim("batch", min=1, max=64), 2: side["h"], 3: side["w"]}}


def export_program(model, path):
    """The network as a torch.export program (.pt2), loadable with torch.export.load(path).module()."""
    program = torch.export.export(model, (example_batch(model.cfg),), dynamic_shapes=dynamic_shapes(model.cfg))
    with warnings.catch_warnings():  # channels-last weights share no "complete" storage; they load fine
        warnings.filterwarnings("ignore", message="No complete tensor found")
        D.write_atomic(path, lambda tmp: torch.export.save(program, tmp))
    return program


def export_onnx(model, path, opset=18):
    """The network as ONNX with its ModelConfig and InferenceConfig in its metadata (W.ONNX_CONFIG_KEY)."""
    import onnx  # only exporting needs onnx and onnxscript

    def write(tmp):
        program = torch.onnx.export(model, (example_batch(model.cfg),), dynamic_shapes=dynamic_shapes(model.cfg),
                                    input_names=["images"], output_names=["cls_logits", "box_deltas"],
                                    opset_version=opset, dynamo=True, verbose=False)
        proto = program.model_proto
        configs = W.config_entries(model.cfg, model.inference)
        proto.metadata_props.add(key=W.ONNX_CONFIG_KEY, value=json.dumps(configs))
        proto.producer_name = "retinanet export.py"
        onnx.save(proto, tmp)

    D.write_atomic(path, write)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=infer.DEFAULT_WEIGHTS,
                   help="checkpoint of this project, 'torchvision' or 'torchvision-v2'")
    p.add_argument("--out", default=DEFAULT_OUT, help="the ONNX file; the .pt2 program goes beside it")
    p.add_argument("--no-program", action="store_true", help="write only the ONNX file")
    p.add_argument("--opset", type=int, default=18)
    return p


def main(args):
    if not args.out.endswith(".onnx"):
        raise ValueError(f"{args.out}: the output must end in .onnx")
    if str(args.weights).endswith(".onnx"):
        raise ValueError(f"{args.weights}: already exported; export.py takes a checkpoint or 'torchvision'")
    model = infer.load_model(args.weights)  # as infer.py runs it: BN folded, channels-last
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with torch.no_grad():
        export_onnx(model, args.out, args.opset)
        print(f"{args.out}: ONNX, opset {args.opset}, {model.cfg.num_classes} classes, inputs (N, 3, H, W) with "
              f"H, W multiples of {model.cfg.size_divisible}; run it with infer.py --weights {args.out}")
        program = None if args.no_program else os.path.splitext(args.out)[0] + ".pt2"
        if program:
            export_program(model, program)
            print(f"{program}: torch.export program (torch.export.load(path).module())")
    return args.out, program


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

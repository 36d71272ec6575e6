"""See focal loss work: a Gradio explorer of detections, anchor assignments and the loss CDFs (§3, §4, Fig. 4).

    python app.py                                          # quick start checkpoint + shapes val, on 127.0.0.1:7860
    python app.py --weights runs/retinanet/checkpoint.pt --data /path/to/coco --split val2017 --port 8000
    python app.py --host 0.0.0.0                           # only if you want other machines to reach it

Tab "Detect": detections on an uploaded or example image (model.detect). Tab "Anchors": which anchors
training makes positive or ignores for each box (anchors.match), with live IoU thresholds. Tab "Focal
loss": FL against CE (Fig. 1) and the loss CDFs of the loaded model (Fig. 4) for any gamma, re-plotted
from analyze.py's cache of per-sample logits. Nothing is computed twice or copied from those files.
"""
import argparse
import json
import os
import time

import gradio as gr
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

import analyze
import anchors as A
import infer
import model as M

MAX_PIXELS = 40_000_000  # larger uploads get a message, not a long wait


class Explorer:
    """What the app loads once: the model and the dataset; the Fig. 4 cache on first use."""

    def __init__(self, weights, data, split=None, out="runs/analyze", device="cpu"):
        self.model = infer.load_model(weights, device)
        self.cfg, self.device = self.model.cfg, device
        self.ds = analyze.dataset(data, split, self.cfg, train_like=True)
        self.cache, self.key = os.path.join(out, "cdf_cache.npz"), analyze.cache_key(weights, self.ds.ann_file, None)
        self.ablate = os.path.join(out, "ablate.json")
        self.logits = None

    def detect(self, path, score_thresh):
        if not path:  # the image was cleared
            return None, [], ""
        image, scale = load(path, max(self.cfg.max_size, 800))
        t0 = time.perf_counter()
        det = M.detect(self.model, [image], score_thresh=score_thresh)[0]
        ms = (time.perf_counter() - t0) * 1000
        names = self.cfg.class_names
        rows = [[names[lab] if lab < len(names) else str(lab), round(s, 3), *[round(v * scale, 1) for v in box]]
                for box, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())]
        drawn = infer.draw(image, det, names).permute(1, 2, 0).numpy()
        return drawn, rows, f"{len(rows)} detections; the model took **{ms:.0f} ms** ({self.device})"

    def anchors(self, index, path, boxes_text, fg_iou, bg_iou, levels):
        """Anchors that training assigns to each box, drawn: green positive, orange ignored."""
        if path:  # an upload, with boxes typed as "x1 y1 x2 y2" lines in its pixels
            image, scale = load(path, self.cfg.max_size)
            try:
                boxes = torch.tensor([[float(v) for v in line.replace(",", " ").split()] for line in
                                      boxes_text.strip().splitlines() if line.strip()]).reshape(-1, 4) / scale
            except (ValueError, RuntimeError):
                raise gr.Error("boxes: one 'x1 y1 x2 y2' per line") from None
            if not (boxes[:, 2:] > boxes[:, :2]).all():
                raise gr.Error("boxes: each needs x2 > x1 and y2 > y1")
            h, w = image.shape[1:]  # to the training scale, as the dataset images are
            image = M.resize_image(image.float(), self.cfg).round().to(torch.uint8)
            boxes = boxes * torch.tensor([image.shape[2] / w, image.shape[1] / h] * 2)
        else:
            image, target = self.ds[int(index)]
            boxes = target["boxes"]
        d, bg_iou = self.cfg.size_divisible, min(bg_iou, fg_iou)
        anchors, per_level = M.make_anchors(self.cfg, [-(-s // d) * d for s in image.shape[1:]])
        matched = A.match(anchors, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool), fg_iou, bg_iou,
                          self.cfg.low_quality_matches)[0]
        level = torch.repeat_interleave(torch.arange(3, 8), torch.tensor(per_level))
        shown = torch.isin(level, torch.tensor([int(v[1]) for v in levels] or [0]))
        best = A.box_iou(boxes, anchors).max(1).values if len(boxes) else torch.zeros(0)
        low = best < fg_iou  # boxes that only get their best anchors, through the low-quality rule
        counts = {"positive": int((matched >= 0).sum()), "ignored": int((matched == A.IGNORE).sum()),
                  "negative": int((matched == A.BACKGROUND).sum()), "boxes": len(boxes),
                  "low-quality only": int(low.sum())}
        zoom = max(1, 480 // max(image.shape[1:]))  # small images are drawn enlarged, so anchors stay visible
        out = torch.nn.functional.interpolate(image[None], scale_factor=zoom, mode="nearest")[0]
        anchors, boxes = anchors * zoom, boxes * zoom
        for mask, color in (((matched == A.IGNORE) & shown, "orange"), ((matched >= 0) & shown, "lime")):
            if mask.any():
                out = draw_bounding_boxes(out, anchors[mask], colors=color, width=1)
        if len(boxes):
            out = draw_bounding_boxes(out, boxes, colors=["red" if x else "white" for x in low.tolist()], width=2,
                                      labels=[f"{b:.2f}" for b in best.tolist()], font=infer.FONT, font_size=12)
        return out.permute(1, 2, 0).numpy(), counts

    def focal(self, gamma, alpha, progress=gr.Progress()):  # noqa: B008 (Gradio injects the progress bar)
        """Fig. 1 for this gamma and alpha; Fig. 4 of the loaded model for this gamma beside gamma = 0."""
        if self.logits is None:  # made once, then saved: later gammas only re-plot
            self.logits = analyze.load_or_collect(self.model, self.ds, self.cache, self.key, progress=lambda it, total:
                                                  progress.tqdm(it, total=total, desc="running the model once"))
        p_t = np.linspace(0.001, 0.999, 500)
        z = np.log(p_t / (1 - p_t))
        fig1, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(p_t, analyze.focal_values(z, 0.0), label="CE")
        ax.plot(p_t, analyze.focal_values(z, gamma, alpha), label=f"FL, gamma={gamma:g}, alpha_t={alpha:g}")
        ax.set(xlabel="p_t", ylabel="loss", ylim=(0, 5), title="Fig. 1 (a positive example)")
        ax.legend()
        fig2, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        shares = {}
        for g in sorted({0.0, float(gamma)}):
            for ax, kind, title in zip(axes, ("pos", "neg"), ("foreground", "background")):
                x, y, shares[f"{kind} gamma={g:g}"] = analyze.cdf(self.logits[kind], g)
                ax.plot(x, y, label=f"gamma={g:g}")
                ax.set(xlabel=f"fraction of {title} examples", ylabel="cumulative normalized loss", title=title)
                ax.legend()
        fig1.tight_layout(), fig2.tight_layout()
        plt.close(fig1), plt.close(fig2)
        table = ""
        if os.path.exists(self.ablate):
            with open(self.ablate) as f:
                table = "### Table 1 in miniature (`analyze.py ablate`)\n\n" + json.load(f)["markdown"]
        return fig1, fig2, shares, table


def load(path, limit):
    """An uploaded image through infer.load_image, or a message in the app saying why not."""
    if not path:
        raise gr.Error("upload an image or pick one of the examples")
    name = os.path.basename(path)
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise gr.Error(f"{name}: {im.size[0]}x{im.size[1]} is too large (at most {MAX_PIXELS // 10**6} MP)")
        return infer.load_image(path, limit=limit)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise gr.Error(f"{name}: not an image this app can read ({str(e).splitlines()[0]})") from None


def build(ex, examples):
    with gr.Blocks(title="RetinaNet explorer") as demo:
        gr.Markdown(f"# RetinaNet and focal loss\n`{len(ex.cfg.class_names)}` classes, {ex.cfg.arch}, "
                    f"images of {ex.cfg.min_size} px; dataset `{ex.ds.ann_file}` ({len(ex.ds)} images)")
        with gr.Tab("Detect"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="image", sources=["upload"])
                    thresh = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="score threshold")
                    go = gr.Button("Detect", variant="primary")
                    gr.Examples(examples, inputs=image)
                with gr.Column():
                    drawn, timing = gr.Image(label="detections", height=420), gr.Markdown()
                    table = gr.Dataframe(headers=["class", "score", "x1", "y1", "x2", "y2"], label="detections")
            gr.on([go.click, thresh.release, image.change], ex.detect, [image, thresh], [drawn, table, timing],
                  api_name="detect")
        with gr.Tab("Anchors") as anchors_tab:
            with gr.Row():
                with gr.Column():
                    index = gr.Slider(0, len(ex.ds) - 1, value=0, step=1, label="dataset image")
                    fg = gr.Slider(0.05, 0.95, value=ex.cfg.fg_iou, step=0.05, label="foreground: IoU >=")
                    bg = gr.Slider(0.0, 0.95, value=ex.cfg.bg_iou, step=0.05, label="background: IoU <")
                    levels = gr.CheckboxGroup(list(analyze.LEVELS), value=list(analyze.LEVELS), label="show anchors of")
                    upload = gr.Image(type="filepath", label="or your own image", sources=["upload"])
                    boxes = gr.Textbox(label="its boxes, one 'x1 y1 x2 y2' a line", lines=3)
                with gr.Column():
                    assigned = gr.Image(label="green: positive anchors, orange: ignored; red box: low-quality only",
                                        height=480)
                    counts = gr.JSON(label="anchors")
            events = [anchors_tab.select, index.change, fg.change, bg.change, levels.change, upload.change]
            gr.on(events + [boxes.submit], ex.anchors, [index, upload, boxes, fg, bg, levels], [assigned, counts],
                  api_name="anchors")
        with gr.Tab("Focal loss") as focal_tab:
            with gr.Row():
                gamma = gr.Slider(0.0, 5.0, value=2.0, step=0.1, label="gamma")
                alpha = gr.Slider(0.0, 1.0, value=0.25, step=0.05, label="alpha")
            with gr.Row():
                curves = gr.Plot(label="FL vs CE", elem_id="curves")
                cdfs = gr.Plot(label="loss CDFs of the loaded model", elem_id="cdfs")
            shares, ablate = gr.JSON(label="share of the loss carried by the hardest samples"), gr.Markdown()
            gr.on([focal_tab.select, gamma.change, alpha.change], ex.focal, [gamma, alpha],
                  [curves, cdfs, shares, ablate], api_name="focal")
    return demo


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=infer.DEFAULT_WEIGHTS, help="checkpoint, or torchvision / torchvision-v2")
    p.add_argument("--data", default="data/shapes", help="COCO-format root for the Anchors and Focal loss tabs")
    p.add_argument("--split", help="split of --data (default: val, else val2017)")
    p.add_argument("--out", default="runs/analyze", help="where analyze.py keeps its cache and ablate table")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    return p


def main(args):
    ex = Explorer(args.weights, args.data, args.split, args.out, args.device)
    examples = [os.path.join(ex.ds.img_dir, ex.ds.coco.imgs[i]["file_name"]) for i in ex.ds.ids[:4]]
    shared = os.environ.get("RETINANET_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "shared", "data"))
    photos = os.path.join(shared, "demo")  # real photos, when the shared data folder is there
    if os.path.isdir(photos):
        examples += sorted(os.path.join(photos, f) for f in os.listdir(photos))
    # show_error: an upload Gradio itself cannot open (not an image) gets PIL's one-line reason in the app
    build(ex, examples).queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                       max_file_size="20mb", allowed_paths=[os.path.abspath(photos)])


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

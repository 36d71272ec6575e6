"""See focal loss work: a Gradio explorer of detections, anchor assignments and the loss (§3, §4, Fig. 1, Fig. 4).

    python app.py                                          # quick start checkpoint + shapes val, on 127.0.0.1:7860
    python app.py --weights torchvision --data ../shared/data/coco_val2017_subset --split val2017
    python app.py --weights runs/retinanet/checkpoint.pt --data /path/to/coco --split val2017 --port 8000
    python app.py --host 0.0.0.0                           # only if you want other machines to reach it

Tab "Detect": detections on an uploaded or example image (model.detect). Tab "Anchors": which anchors
training makes positive or ignores for each box (anchors.match), with live IoU thresholds. Tab "Focal
loss": FL against CE (Fig. 1), the loss CDFs of the loaded model for several gamma (Fig. 4, from
fig4.py's cache), where the loss and its gradient go, and Table 1 (analyze.py ablate). Nothing is
computed here that those files compute. On a fresh clone, before any training, the app starts with the
quick start's configuration: Fig. 1 and the Anchors tab work, and the other tabs say how to get a model.
"""
import argparse
import hashlib
import os
import time

import gradio as gr
import matplotlib.pyplot as plt
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

import analyze
import anchors as A
import data as D
import fig4
import infer
import model as M
import shapes
import train
import weights as W
from evaluate import category_ids
from loss import LossConfig
from study import dense

MAX_PIXELS = 40_000_000  # larger uploads get a message, not a long wait
PAPER_GAMMAS = (0.0, 0.5, 1.0, 2.0)  # Fig. 4's
TORCHVISION = ("`python app.py --weights torchvision --data /path/to/coco --split val2017` (the weights download "
               "once; the COCO images are for Fig. 4)")
NO_MODEL = ("No trained model yet. Train the quick start's (`python train.py`, about 5-10 minutes on a CPU), "
            f"or load torchvision's COCO RetinaNet: {TORCHVISION}.")


class Explorer:
    """What the app loads once: the model (if there is one) and the dataset; the Fig. 4 cache on first use."""

    def __init__(self, weights, data, split=None, out="runs/analyze", device="cpu", amp="auto"):
        self.model, self.device, self.weights, self.assign = None, device, weights, LossConfig()
        self.amp, why = M.autocast_choice(amp, torch.device(device))  # infer.py's --amp: the same detections
        if weights != infer.DEFAULT_WEIGHTS or os.path.exists(weights):
            self.model = infer.load_model(weights, device)
            print(why)
            self.cfg, self.assign = self.model.cfg, W.load_loss_config(weights)  # anchors assigned as it trained
        else:  # a fresh clone: the quick start's configuration, for Fig. 1 and the Anchors tab
            q = train.QUICKSTART
            self.cfg = M.ModelConfig(num_classes=len(shapes.SHAPES), class_names=shapes.SHAPES, arch=q["arch"],
                                     anchor_sizes=tuple(q["anchor_sizes"]), min_size=q["min_size"],
                                     max_size=q["max_size"], size_divisible=q["size_divisible"])
        path = train.QUICKSTART_DATA
        if data == path and not os.path.exists(os.path.join(path, "annotations", "instances_val.json")):
            print(f"writing the shapes set to {path} (once, under a minute) ...")
            shapes.make_shapes(path)
        self.ds = analyze.dataset(analyze.split_paths(data, split), self.cfg, train_like=True, check_classes=False)
        self.mismatch = None  # the model's classes are not the dataset's: Detect and Anchors work, Fig. 4 cannot
        try:
            if self.model is not None:
                category_ids(self.cfg, self.ds)
        except ValueError as e:
            self.mismatch = f"{e}. Fig. 4 needs images of the model's own classes: pass them with `--data`."
            print(self.mismatch)
        self.cache = os.path.join(out, "cdf_cache.npz")
        self.key = fig4.cache_key(weights, self.ds.ann_file, None)
        self.out, self.own = out, None
        self.logits = None

    def detect(self, path, score_thresh):
        if not path:  # the image was cleared
            return None, [], ""
        if self.model is None:
            raise gr.Error(NO_MODEL)
        image, scale = load(path, max(self.cfg.max_size, 800))
        t0 = time.perf_counter()
        det = M.detect(self.model, [image], score_thresh, amp=self.amp is not None)[0]
        ms = (time.perf_counter() - t0) * 1000
        names, order = self.cfg.class_names, det["scores"].argsort(descending=True)
        rows = [[names[lab] if lab < len(names) else str(lab), round(s, 3), *[round(v * scale, 1) for v in box]]
                for box, s, lab in zip(det["boxes"][order].tolist(), det["scores"][order].tolist(),
                                       det["labels"][order].tolist())]
        drawn = infer.draw(image, det, names).permute(1, 2, 0).numpy()
        note = ""
        synthetic = set(names) <= set(shapes.SHAPES) | set(dense.CLASSES)
        if synthetic and not self.is_dataset_picture(path):
            note = (f"\n\nThis model knows only the {len(names)} classes of a synthetic set ({', '.join(names[:4])}"
                    f"{', ...' if len(names) > 4 else ''}): on a photo it finds little. For photos, load "
                    f"torchvision's COCO model: {TORCHVISION}.")
        return drawn, rows, f"{len(rows)} detections; the model took **{ms:.0f} ms** ({self.device}){note}"

    def is_dataset_picture(self, path):
        """Whether a picture is one of the dataset's, by content: Gradio copies uploads and examples alike."""
        if self.own is None:  # once, on the first question
            self.own = {digest(os.path.join(self.ds.img_dir, f)) for f in os.listdir(self.ds.img_dir)}
        return digest(path) in self.own

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
                          self.assign.low_quality_matches)[0]
        level = torch.repeat_interleave(torch.arange(3, 8), torch.tensor(per_level))
        shown = torch.isin(level, torch.tensor([int(v[1]) for v in levels] or [0]))
        best = A.box_iou(boxes, anchors).max(1).values if len(boxes) else torch.zeros(0)
        low = best < fg_iou  # boxes that only get their best anchors, through the low-quality rule
        counts = [["boxes", len(boxes)], ["positive anchors", int((matched >= 0).sum())],
                  ["ignored anchors", int((matched == A.IGNORE).sum())],
                  ["negative anchors", int((matched == A.BACKGROUND).sum())],
                  ["boxes with only a low-quality match", int(low.sum())]]
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
        """Fig. 1 for all of the paper's gamma; Fig. 4 of the loaded model; where the loss goes; Table 1."""
        fig1 = curves(gamma, alpha)
        tables = analyze.study_tables(self.out)
        if self.model is None:
            return fig1, None, f"**Fig. 4 needs a trained model.** {NO_MODEL}", [], [], tables
        if self.mismatch:
            return fig1, None, f"**{self.mismatch}**", [], [], tables
        if self.logits is None:  # made once, then saved: later gammas only re-plot
            self.logits = fig4.load_or_collect(self.model, self.ds, self.cache, self.key, assign=self.assign,
                                               progress=lambda it, total: progress.tqdm(it, total=total,
                                                                                        desc="running the model once"))
        gammas = sorted(set(PAPER_GAMMAS) | {float(gamma)})
        fig, _, shares = fig4.fig4(self.logits, gammas, highlight=float(gamma), figsize=(12, 4.5))
        fig.suptitle(f"Fig. 4 on {self.logits['images']} images of {os.path.basename(self.ds.img_dir)}: "
                     f"{len(self.logits['pos']):,} positive and {self.logits['negatives_seen']:,} negative samples")
        fig.tight_layout()
        plt.close(fig)
        hardest = [[f"{g:g}", *(f"{100 * shares[f'{g:g}'][k][f'hardest {p}']:.1f}%" for k in ("pos", "neg")
                                for p in ("20%", "1%"))] for g in gammas]
        where = fig4.where_the_loss_goes(self.logits, gammas)
        flow = [[f"{g:g}", *(f"{100 * where[f'{g:g}'][kind]['positives']:.1f}%" for kind in ("loss", "grad")),
                 *(f"{100 * fig4.easy_share(where[f'{g:g}'][kind]):.1f}%" for kind in ("loss", "grad"))]
                for g in gammas]
        return fig1, fig, "", hardest, flow, tables


def curves(gamma, alpha):
    """Fig. 1 for each of the paper's gamma, the slider's drawn bold (analyze.fig1)."""
    fig = analyze.fig1(analyze.GAMMAS, bold=gamma, alpha=alpha)[0]
    plt.close(fig)
    return fig


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


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
        model = f"`{ex.weights}`" if ex.model is not None else "no trained model yet"
        gr.Markdown(f"# RetinaNet and focal loss\n{model}: {len(ex.cfg.class_names)} classes, {ex.cfg.arch}, "
                    f"images of {ex.cfg.min_size} px; dataset `{ex.ds.ann_file}` ({len(ex.ds)} images)")
        with gr.Tab("Detect"):
            if ex.model is None:
                gr.Markdown(f"**{NO_MODEL}**")
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="image", sources=["upload"])
                    thresh = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="score threshold")
                    go = gr.Button("Detect", variant="primary")
                    gr.Examples(examples, inputs=image)
                with gr.Column():
                    drawn, timing = gr.Image(label="detections", height=420), gr.Markdown()
                    table = gr.Dataframe(headers=["class", "score", "x1", "y1", "x2", "y2"],
                                         label="detections, highest score first")
            gr.on([go.click, thresh.release, image.change], ex.detect, [image, thresh], [drawn, table, timing],
                  api_name="detect")
        with gr.Tab("Anchors") as anchors_tab:
            with gr.Row():
                with gr.Column():
                    index = gr.Slider(0, len(ex.ds) - 1, value=0, step=1, label="dataset image")
                    fg = gr.Slider(0.05, 0.95, value=ex.assign.fg_iou, step=0.05, label="foreground: IoU >=")
                    bg = gr.Slider(0.0, 0.95, value=ex.assign.bg_iou, step=0.05, label="background: IoU <")
                    levels = gr.CheckboxGroup(list(analyze.LEVELS), value=list(analyze.LEVELS), label="show anchors of")
                    upload = gr.Image(type="filepath", label="or your own image", sources=["upload"])
                    boxes = gr.Textbox(label="its boxes, one 'x1 y1 x2 y2' a line", lines=3)
                with gr.Column():
                    assigned = gr.Image(label="green: positive anchors, orange: ignored; red box: low-quality only",
                                        height=480)
                    counts = gr.Dataframe(headers=["", "count"], label="anchors", elem_id="anchor-counts")
            events = [anchors_tab.select, index.change, fg.change, bg.change, levels.change, upload.change]
            gr.on(events + [boxes.submit], ex.anchors, [index, upload, boxes, fg, bg, levels], [assigned, counts],
                  api_name="anchors")
        with gr.Tab("Focal loss") as focal_tab:
            with gr.Row():
                gamma = gr.Slider(0.0, 5.0, value=2.0, step=0.1, label="gamma")
                alpha = gr.Slider(0.0, 1.0, value=0.25, step=0.05, label="alpha (of the bold Fig. 1 curve)")
            gr.Markdown("### Fig. 1: the focal loss down-weights well-classified examples")
            fig1 = gr.Plot(show_label=False, elem_id="curves")  # a label would cover the figure's own title
            gr.Markdown("### Fig. 4: where each γ puts the loss of the loaded model (the slider's γ in bold)")
            cdfs = gr.Plot(show_label=False, elem_id="cdfs")
            missing = gr.Markdown()
            hardest = gr.Dataframe(headers=["gamma", "hardest 20% of positives", "hardest 1% of positives",
                                            "hardest 20% of negatives", "hardest 1% of negatives"],
                                   label="share of their loss carried by the hardest samples", elem_id="hardest")
            flow = gr.Dataframe(headers=["gamma", "positives: share of the loss", "positives: of the gradient",
                                         "easy negatives (p_t > 0.9): of the loss", "easy negatives: of the gradient"],
                                label="where the classification loss and its gradient Σ|∂L/∂z| go (gamma 0: CE)",
                                elem_id="flow")
            study = gr.Markdown()
            gr.on([focal_tab.select, gamma.change, alpha.change], ex.focal, [gamma, alpha],
                  [fig1, cdfs, missing, hardest, flow, study], api_name="focal")
    return demo


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=infer.DEFAULT_WEIGHTS, help="checkpoint, or torchvision / torchvision-v2")
    p.add_argument("--data", default="data/shapes", help="COCO-format root for the Anchors and Focal loss tabs")
    p.add_argument("--split", help="split of --data (default: val, else val2017)")
    p.add_argument("--out", default="runs/analyze", help="where analyze.py keeps its cache and Table 1")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="as infer.py's --amp")
    return p


def main(args):
    ex = Explorer(args.weights, args.data, args.split, args.out, args.device, args.amp)
    examples = [os.path.join(ex.ds.img_dir, ex.ds.coco.imgs[i]["file_name"]) for i in ex.ds.ids[:4]]
    shared = os.environ.get("RETINANET_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "shared", "data"))
    photos = os.path.join(shared, "demo")  # real photos, when the shared data folder is there
    if os.path.isdir(photos):
        examples += sorted(os.path.join(photos, f) for f in os.listdir(photos) if f.lower().endswith(
            D.IMAGE_EXTENSIONS))
    # show_error: an upload Gradio itself cannot open (not an image) gets PIL's one-line reason in the app
    build(ex, examples).queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                       max_file_size="50mb", allowed_paths=[os.path.abspath(photos)])


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

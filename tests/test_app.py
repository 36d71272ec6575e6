"""app.py: the real server on a free localhost port, every endpoint through gradio_client, and a real
headless Chromium (Debian's, driven by Playwright) clicking through the tabs."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import anchors as A
import fig4
import infer
import model as M
import weights as W
from conftest import ROOT, shared_path
from tools import bench_pairs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, cwd=ROOT):
    """app.py started on a free localhost port: (process, url), once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), *args, "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, started = f"http://127.0.0.1:{port}/", time.time()
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() - started > 120:
                proc.kill()
                pytest.fail(f"app.py did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_shapes, tmp_path_factory):
    # the README's screenshots come from the quick start's checkpoint, shapes set and analyze.py outputs
    weights = os.environ.get("RETINANET_APP_WEIGHTS", tiny_checkpoint)
    data = os.environ.get("RETINANET_APP_DATA", tiny_shapes)
    out = os.environ.get("RETINANET_APP_OUT", str(tmp_path_factory.mktemp("app")))
    started = time.time()
    proc, url = launch(["--weights", weights, "--data", data, "--out", out, "--amp", "on"])  # bfloat16 on any CPU
    yield {"url": url, "weights": weights, "data": data, "out": out, "startup_s": time.time() - started}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def test_server_binds_to_localhost_only_and_starts_in_seconds(server):
    assert server["startup_s"] < 60
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # sends nothing: finds the outward address
            probe.connect(("192.0.2.1", 9))
            other = probe.getsockname()[0]
    except OSError:
        other = "127.0.0.1"
    if other.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    with socket.socket() as s:  # nothing listens on the machine's other addresses
        s.settimeout(2)
        assert s.connect_ex((other, int(server["url"].rsplit(":", 1)[1].strip("/")))) != 0


def test_detect_endpoint_returns_the_detections_of_model_detect(client, server):
    from gradio_client import handle_file

    path = os.path.join(server["data"], "val", "000001.jpg")
    _, table, timing = client.predict(handle_file(path), 0.1, api_name="/detect")
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    # the app's model (infer.load_model's: BN folded), under bfloat16 autocast as --amp on asks
    expected = M.detect(infer.load_model(server["weights"]), [image], score_thresh=0.1, amp=True)[0]
    rows = table["data"]
    assert len(rows) == len(expected["scores"]) and "ms" in timing
    assert "knows only the" not in timing  # a picture of the model's own set: no note that it knows only shapes
    names = list(infer.load_model(server["weights"]).cfg.class_names)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][1], rows[i][2:]))  # bfloat16 ties: either order
    got = {"boxes": torch.tensor([rows[i][2:] for i in order]), "scores": torch.tensor([rows[i][1] for i in order]),
           "labels": torch.tensor([names.index(rows[i][0]) for i in order])}
    ok, message = bench_pairs.same_detections([expected], [got], score_atol=1e-3, box_atol=0.1)  # rounded rows
    assert ok, message


def test_bad_upload_gives_a_message_not_a_traceback(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(Exception, match="cannot identify image file .*notes.jpg"):  # Gradio's check, PIL's words
        client.predict(handle_file(str(bad)), 0.5, api_name="/detect")
    cut = tmp_path / "cut.jpg"  # opens, then fails to decode: our message
    cut.write_bytes(open(os.path.join(os.path.dirname(__file__), "..", "docs", "infer_shapes.png"), "rb").read()[:3000])
    with pytest.raises(Exception, match="cut.jpg: not an image this app can read"):
        client.predict(handle_file(str(cut)), 0.5, api_name="/detect")
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 6000)).save(huge)  # 42 megapixels, a small file
    with pytest.raises(Exception, match="huge.png: 7000x6000 is too large"):
        client.predict(handle_file(str(huge)), 0.5, api_name="/detect")


def test_anchors_endpoint_counts_equal_the_matcher(client, server):
    levels = ["P3", "P4", "P5", "P6", "P7"]
    _, table = client.predict(2, None, "", 0.6, 0.3, levels, api_name="/anchors")
    counts = dict(table["data"])
    cfg = W.load_checkpoint(server["weights"]).cfg
    ds = analyze.dataset(analyze.split_paths(server["data"]), cfg, train_like=True)
    image, target = ds[2]
    d = cfg.size_divisible
    anchors, _ = M.make_anchors(cfg, [-(-s // d) * d for s in image.shape[1:]])
    boxes = target["boxes"]
    matched = A.match(anchors, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool), 0.6, 0.3)[0]
    assert counts["positive anchors"] == int((matched >= 0).sum()) > 0
    assert counts["ignored anchors"] == int((matched == A.IGNORE).sum())
    assert counts["negative anchors"] == int((matched == A.BACKGROUND).sum())


def test_anchors_endpoint_on_an_upload_with_typed_boxes(client, server):
    from gradio_client import handle_file

    path = os.path.join(server["data"], "val", "000001.jpg")
    _, table = client.predict(0, handle_file(path), "10 10 50 40\n20, 30, 60, 90", 0.5, 0.4, ["P3"],
                              api_name="/anchors")
    counts = dict(table["data"])
    assert counts["boxes"] == 2 and counts["positive anchors"] >= 2


def test_focal_endpoint_tables_equal_fig4s_numbers(client, server):
    _, _, missing, hardest, flow, _ = client.predict(2.0, 0.25, api_name="/focal")
    model = W.load_checkpoint(server["weights"])
    ds = analyze.dataset(analyze.split_paths(server["data"]), model.cfg, train_like=True)
    logits = fig4.collect_logits(model, ds, progress=lambda it, total: it)
    assert missing == "" and [row[0] for row in hardest["data"]] == ["0", "0.5", "1", "2"]  # the paper's gammas
    where = fig4.where_the_loss_goes(logits, (0.0, 2.0))
    for row, g in zip((hardest["data"][0], hardest["data"][3]), (0.0, 2.0)):
        pos, neg = (fig4.cdf(logits[kind], g)[2] for kind in ("pos", "neg"))
        assert row[1:] == [f"{100 * v:.1f}%" for v in (pos["hardest 20%"], pos["hardest 1%"], neg["hardest 20%"],
                                                       neg["hardest 1%"])]
    for row, g in zip((flow["data"][0], flow["data"][3]), ("0", "2")):
        expected = [where[g]["loss"]["positives"], where[g]["grad"]["positives"], fig4.easy_share(where[g]["loss"]),
                    fig4.easy_share(where[g]["grad"])]
        assert row[1:] == [f"{100 * v:.1f}%" for v in expected]
    assert os.path.exists(os.path.join(server["out"], "cdf_cache.npz"))  # later gammas only re-plot


def test_detect_survives_its_extremes(client, server, tmp_path):
    from gradio_client import handle_file

    path = os.path.join(server["data"], "val", "000001.jpg")
    for thresh in (0.05, 1.0):
        _, table, _ = client.predict(handle_file(path), thresh, api_name="/detect")
        scores = [row[1] for row in table["data"]]
        assert scores == sorted(scores, reverse=True) and (thresh < 1 or not scores)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(one)
    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 5000), (90, 120, 150)).save(big)  # 40 megapixels, the most the app takes
    for picture in (one, big):
        drawn, _, timing = client.predict(handle_file(str(picture)), 0.5, api_name="/detect")
        assert "detections; the model took" in timing and "knows only the" in timing  # a photo, a shapes model


def test_a_fresh_clone_starts_without_a_checkpoint(tiny_shapes, tmp_path):
    from gradio_client import Client, handle_file

    proc, url = launch(["--data", tiny_shapes], cwd=tmp_path)  # an empty folder: no runs/quickstart/checkpoint.pt
    try:
        client = Client(url, verbose=False)
        fig1, cdfs, missing, hardest, _, _ = client.predict(2.0, 0.25, api_name="/focal")
        assert fig1 is not None and "python train.py" in missing and "--weights torchvision" in missing
        _, table = client.predict(0, None, "", 0.5, 0.4, ["P3"], api_name="/anchors")
        assert dict(table["data"])["positive anchors"] > 0  # the quick start's anchors on the shapes set
        with pytest.raises(Exception, match="No trained model yet"):
            client.predict(handle_file(os.path.join(tiny_shapes, "val", "000001.jpg")), 0.5, api_name="/detect")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_endpoint_table_the_study_and_the_miniature_are_all_shown(tmp_path, monkeypatch):
    import json

    from study import endpoint

    monkeypatch.setattr(endpoint, "LEDGER", str(tmp_path / "ledger.json"))
    assert "analyze.py ablate --preset dense" in analyze.study_tables(str(tmp_path))  # none yet: how to get them
    for preset, iters in (("dense", 800), ("quickstart", 200)):
        (tmp_path / f"ablate_{preset}.json").write_text(json.dumps({"iters": iters, "markdown": f"| {preset} |"}))
    it = endpoint.ITERS
    run = {"stats": {"AP": 0.3}, "curve": [{"iter": i, "eval": {"AP": 0.3}} for i in (it * 6 // 8, it)]}
    ledger = {endpoint.key(row, lr, 0, it): run for row in "bd" for lr in endpoint.LRS}  # the LR stage, a tie
    ledger[endpoint.key("d", 0.01, 0, it)] = {**run, "val": {"AP": 0.25}}  # (d) at the lowest LR: the chosen one
    (tmp_path / "ledger.json").write_text(json.dumps(ledger))
    text = analyze.study_tables(str(tmp_path))
    assert "dense set" in text and "| dense |" in text and "miniature" in text and "| quickstart |" in text
    assert "| (d) | FL γ = 2, α = .25 | 34.0 | 1.00 | 0.01 | 1 | 0.250 | 1.00 | yes |" in text
    assert "| (b) held-out AP (gain over the last quarter) | 0.300 (+0.000) |" in text


def test_a_model_of_other_classes_starts_and_fig4_says_why_it_cannot(tiny_checkpoint, tmp_path):
    import app

    coco = shared_path("coco_val2017_subset")  # 80 COCO classes; the tiny model knows 4 shapes
    explorer = app.Explorer(tiny_checkpoint, coco, "val2017", out=str(tmp_path))
    _, cdfs, message, *_ = explorer.focal(2.0, 0.25)
    assert cdfs is None and "instances_val2017.json: the model's classes are not this dataset's" in message
    drawn, _, _ = explorer.detect(os.path.join(coco, "val2017", sorted(os.listdir(os.path.join(coco, "val2017")))[0]),
                                  0.5)
    assert drawn.ndim == 3  # Detect still works


def test_browser_clicks_through_every_tab_and_the_gamma_slider_changes_the_plot(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} not found: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shots = os.environ.get("RETINANET_SCREENSHOTS", str(tmp_path))  # README screenshots: RETINANET_SCREENSHOTS=docs
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server["url"])
        page.get_by_role("tab", name="Detect").wait_for()
        page.locator(".gallery-item, button.gallery-item, [data-testid='examples'] button").first.click()
        page.get_by_text("detections; the model took").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=os.path.join(shots, "app_detect.jpg"), type="jpeg", quality=70)

        page.get_by_role("tab", name="Anchors").click()
        page.locator("#anchor-counts").get_by_text("positive anchors").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=os.path.join(shots, "app_anchors.jpg"), type="jpeg", quality=70)

        page.get_by_role("tab", name="Focal loss").click()
        cdf_plot = page.locator("#cdfs img[src^='data:image']")  # matplotlib, rendered as an image
        cdf_plot.wait_for(timeout=120_000)
        before = cdf_plot.get_attribute("src")
        gamma = page.get_by_label("number input for gamma")  # the box beside the slider
        gamma.fill("0.5")
        gamma.press("Enter")
        deadline = time.time() + 60
        while time.time() < deadline and cdf_plot.get_attribute("src") == before:
            time.sleep(0.2)
        assert cdf_plot.get_attribute("src") != before
        page.wait_for_timeout(2000)  # let the other outputs settle before the screenshot
        # Fig. 4's two panels readable in a 1280-px window: the figure at least 1000 px wide, 500 a panel
        assert cdf_plot.bounding_box()["width"] >= 1000
        assert page.locator("#curves img[src^='data:image']").bounding_box()["width"] >= 500
        # the shares as tables of percentages, not a JSON viewer
        page.locator("#hardest").get_by_text("%").first.wait_for(timeout=30_000)
        assert page.locator("#flow").get_by_text("%").count() > 0
        assert page.locator("[data-testid='json'], .json-holder").count() == 0
        page.screenshot(path=os.path.join(shots, "app_focal.jpg"), type="jpeg", quality=70, full_page=True)
        browser.close()
    for name in ("app_detect", "app_anchors", "app_focal"):
        assert os.path.getsize(os.path.join(shots, name + ".jpg")) > 10_000

"""Shared fixtures: the real COCO photos in ../shared/data, and a tiny shapes set made once per run."""
import json
import os

import pytest

import shapes
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RETINANET_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def shared_path(*parts):
    """A path under the shared data folder; skips the test when it is absent, fails when CI is set."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        message = f"{path} not found (set RETINANET_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def layout_cache(tmp_path_factory):
    """train.py's layout probe (engine.probe_layout) keeps its answers under XDG_CACHE_HOME: a fresh one for the
    tests (subprocesses too), not the user's ~/.cache."""
    path = str(tmp_path_factory.mktemp("cache"))
    old, os.environ["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME"), path
    yield path
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """8 train and 4 val shapes images of 96 px."""
    return shapes.make_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=4, size=96, seed=1)


def tiny_flags(shapes, out, iters=4, **extra):
    flags = {"data": shapes, "out": out, "arch": "resnet18", "norm": "bn", "freeze-at": "0", "backbone-weights": "none",
             "channels": "64", "head-norm": "gn", "min-size": "96", "max-size": "96", "size-divisible": "32",
             "anchor-sizes": "16 32 64 128 256", "batch-size": "2", "workers": "0", "log-every": "1", "lr": "0.08",
             "iters": str(iters), "steps": f"{iters * 10} {iters * 20}", "warmup-iters": "2", "ckpt-every": "1000",
             "train-split": "train", "val-split": "val", **extra}
    words = ([f"--{k}"] + v.split() if v is not True else [f"--{k}"] for k, v in flags.items() if v is not None)
    return [w for pair in words for w in pair]


def run(shapes, out, iters=4, **extra):
    return train.main(train.get_args_parser().parse_args(tiny_flags(shapes, out, iters, **extra)))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row for line in f if "loss" in (row := json.loads(line))]  # not the evaluation rows


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_shapes, tmp_path_factory):
    """A checkpoint of the tiny shapes config after 40 iterations: it finds some shapes."""
    out = str(tmp_path_factory.mktemp("tiny_run"))
    run(tiny_shapes, out, iters=40, **{"no-eval": True, "flip": "0", "lr": "0.05", "warmup-iters": "10"})
    return os.path.join(out, "checkpoint.pt")


def analyze_args(*words):
    """analyze.py's arguments from words (numbers and paths too), as its command line parses them."""
    import analyze

    return analyze.get_args_parser().parse_args([str(w) for w in words])

"""study/ablate.py (through analyze.py): seeds aggregate into mean ± std, the sweep pairs FL and CE by seed, a
killed study resumes to the uninterrupted result, the miniature keeps to its time budget; study/dense.py's recipe
reaches train.py whole."""
import json
import types

import numpy as np
import pytest

import analyze
import engine
import train
from conftest import analyze_args as args
from study import ablate, dense

TINY = ("--arch resnet18 --norm bn --freeze-at 0 --backbone-weights none --channels 64 --head-norm gn "
        "--min-size 96 --max-size 96 --size-divisible 32 --anchor-sizes 16 32 64 128 256 --batch-size 2 "
        "--workers 0 --train-split train --val-split val --warmup-iters 1")


def test_ablation_aggregates_seeds(tiny_shapes, tmp_path):
    table = analyze.main(args("ablate", "--iters", 4, "--variants", "b", "f", "--seeds", 2, "--data", tiny_shapes,
                              "--out", tmp_path, f"--train-args={TINY}"))
    runs = table["runs"]
    assert [len(runs["b"]), len(runs["f"])] == [2, 1]  # (b) is a main row: --seeds; (f) --other-seeds
    aps = [r["stats"]["AP"] for r in runs["b"]]
    mean, std = table["rows"]["b"]["AP"]
    assert mean == pytest.approx(np.mean(aps)) and std == pytest.approx(np.std(aps, ddof=1))
    assert [row["iter"] for row in runs["b"][0]["curve"]] == [1, 2, 3, 4]  # AP against iterations
    assert all(0 <= row["eval"]["AP"] <= 1 for row in runs["b"][0]["curve"])
    assert [row["iter"] for row in runs["f"][0]["curve"]] == [4]  # (f): the final evaluation only
    md = json.load(open(tmp_path / "ablate_quickstart.json"))["markdown"]
    assert "Table 1d, OHEM 1:3" in md and "§3.3: CE with the prior" in md and " ± " in md
    # --report-only tabulates what finished and trains nothing: a study that spans sessions, read midway
    table = analyze.main(args("ablate", "--iters", 4, "--variants", "b", "f", "--seeds", 3, "--data", tiny_shapes,
                              "--out", tmp_path, f"--train-args={TINY}", "--report-only"))
    assert [len(table["runs"]["b"]), table["rows"]["b"]["AP"]] == [2, (mean, std)]
    assert not (tmp_path / "ablate" / "quickstart-4" / "shapes" / "b" / "seed2").exists()


def test_the_miniature_starts_no_run_past_its_40_minutes(tiny_shapes, tmp_path, monkeypatch):
    clock, real_run = [0.0], ablate.train_run

    def run_of_15_minutes(out, flags):  # each run takes 15 minutes on this clock
        clock[0] += 15 * 60
        return real_run(out, flags)

    monkeypatch.setattr(ablate, "time", types.SimpleNamespace(time=lambda: clock[0]))  # ablate.py's clock only
    monkeypatch.setattr(ablate, "train_run", run_of_15_minutes)
    study = ["ablate", "--iters", 2, "--variants", "b", "c", "d", "--data", tiny_shapes, "--out", tmp_path,
             f"--train-args={TINY}"]
    assert list(analyze.main(args(*study))["rows"]) == ["b", "c"]  # a third run would end at 45 minutes
    assert list(analyze.main(args(*study, "--budget-minutes", 0))["rows"]) == ["b", "c", "d"]  # 0: no limit


def test_sweep_pairs_fl_and_ce_by_seed_at_each_level(tiny_shapes, tmp_path, monkeypatch):
    backbone = tmp_path / "backbone.pth"  # stands for study/pretrain.py's weights; TINY trains without them
    backbone.write_bytes(b"x")
    monkeypatch.setattr(dense, "BACKBONE", str(backbone))
    monkeypatch.setattr(ablate, "LEVELS", {"one": (tiny_shapes, None, 96), "two": (tiny_shapes, None, 96)})
    sweep = ["sweep", "--iters", 4, "--seeds", 2, "--out", tmp_path, f"--train-args={TINY}"]
    table = analyze.main(args(*sweep))
    for level in ("one", "two"):
        t = table[level]
        assert sorted(t["gap"]) == [0, 1] and all(t["gap"][s] == t["d"][s] - t["b"][s] for s in (0, 1))
        assert t["gap_mean_std"][0] == pytest.approx(np.mean(list(t["gap"].values())))
    assert table["one"]["gap"] == table["two"]["gap"]  # the same set twice: seed for seed the same runs
    assert json.load(open(tmp_path / "sweep.json"))["markdown"].count("\n| ") == 2  # a row a level
    assert analyze.main(args(*sweep, "--report-only")) == table  # tabulated again, nothing trained


@pytest.mark.parametrize("crash_at", [3, 1])  # after the checkpoint of iteration 2, or before any checkpoint
def test_a_killed_study_continues_to_the_result_of_an_uninterrupted_one(tiny_shapes, tmp_path, monkeypatch,
                                                                          crash_at):
    study = ["ablate", "--iters", 4, "--variants", "d", "--data", tiny_shapes, f"--train-args={TINY}"]
    straight = analyze.main(args(*study, "--out", tmp_path / "a"))["runs"]["d"][0]
    calls, loss = [], engine.retinanet_loss

    def killed(*a, **kw):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("killed")
        return loss(*a, **kw)

    monkeypatch.setattr(engine, "retinanet_loss", killed)
    with pytest.raises(RuntimeError, match="killed"):
        analyze.main(args(*study, "--out", tmp_path / "b"))
    run_dir = tmp_path / "b" / "ablate" / "quickstart-4" / "shapes" / "d" / "seed0"
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "lo')  # and the log's last line torn by the kill
    monkeypatch.setattr(engine, "retinanet_loss", loss)
    resumed = analyze.main(args(*study, "--out", tmp_path / "b"))["runs"]["d"][0]
    assert resumed["stats"] == straight["stats"] and resumed["curve"] == straight["curve"]
    with pytest.raises(ValueError, match="made with other flags"):  # a folder is never reused for other settings
        analyze.main(args(*study[:-1], f"--train-args={TINY} --lr 0.5", "--out", tmp_path / "b"))


def test_the_dense_recipe_reaches_train_py_spelled_out_and_the_runs_flags_override_it(tmp_path, monkeypatch):
    """The study's runs say `--preset dense` (their flags, the ledger); train.py, which has no such preset, gets
    DENSE's every value, and a run's own flags after it win. Without the pretrained backbone: one line saying
    how to make it."""
    run = ["--preset", "dense", "--data", "data/dense", "--lr", "0.02", "--steps", "3000", "3600"]
    monkeypatch.setitem(dense.DENSE, "backbone_weights", str(tmp_path / "backbone.pth"))
    with pytest.raises(FileNotFoundError, match=r"backbone.pth: no pretrained backbone yet; `python -m study.pre"):
        dense.train_flags(run)
    (tmp_path / "backbone.pth").write_bytes(b"x")
    args = train.fill_defaults(train.get_args_parser().parse_args(dense.train_flags(run)))
    assert {k: getattr(args, k) for k in dense.DENSE if k not in ("lr", "steps")} == {
        k: v for k, v in dense.DENSE.items() if k not in ("lr", "steps")}
    assert args.lr == 0.02 and args.steps == [3000, 3600] and args.data == "data/dense"
    quick = ["--preset", "quickstart", "--iters", "4"]
    assert dense.train_flags(quick) == quick  # train.py's own presets pass through
    with pytest.raises(SystemExit):  # and train.py itself knows no dense preset
        train.get_args_parser().parse_args(run)

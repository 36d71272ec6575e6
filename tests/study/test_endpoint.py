"""study/endpoint.py (Table 1 at the endpoint): the held-out split, the endpoint rule, the LR choice, and a study
that chooses on held-out pictures, reuses its LR runs as the table's seed 0 and never reruns a finished run."""
import json
import math
import shutil
import types

import pytest
from test_ablate import TINY

import analyze
import data as D
import train
from conftest import analyze_args as args
from study import ablate, dense
from study import endpoint as E


def test_holdout_split_is_disjoint_covers_the_training_pictures_and_is_the_same_each_time(tiny_shapes, tmp_path):
    root = shutil.copytree(tiny_shapes, tmp_path / "set")
    fit, held = (json.load(open(p)) for p in D.holdout_split(root, holdout=3, seed=5))
    train_set = json.load(open(D.coco_paths(root, "train")[0]))
    fit_ids, held_ids = {i["id"] for i in fit["images"]}, {i["id"] for i in held["images"]}
    assert len(held_ids) == 3 and not fit_ids & held_ids
    assert fit_ids | held_ids == {i["id"] for i in train_set["images"]}
    for part, ids in ((fit, fit_ids), (held, held_ids)):  # each picture keeps its own annotations, all of them
        assert sorted(a["id"] for a in part["annotations"]) == sorted(
            a["id"] for a in train_set["annotations"] if a["image_id"] in ids)
    again = tmp_path / "again"
    shutil.copytree(tiny_shapes, again)
    assert json.load(open(D.holdout_split(again, holdout=3, seed=5)[1]))["images"] == held["images"]
    with pytest.raises(ValueError, match="cannot hold out 8 of its 8 images"):
        D.holdout_split(shutil.copytree(tiny_shapes, tmp_path / "third"), holdout=8)


def test_endpoint_is_a_gain_under_0_01_over_the_last_quarter():
    curve = [(100, 0.1), (600, 0.30), (700, 0.31), (800, 0.309)]
    assert E.endpoint_gain(curve, 800) == (pytest.approx(0.009), True)
    assert E.endpoint_gain([(600, 0.30), (800, 0.32)], 800) == (pytest.approx(0.02), False)
    assert E.endpoint_gain([(600, 0.30), (800, 0.25)], 800)[1]  # falling: no more to gain
    assert E.endpoint_gain([(700, 0.30), (800, 0.30)], 800) == (None, False)  # no point at 3/4
    assert E.eval_points(800) == [100, 200, 300, 400, 500, 600, 700, 800]


def test_each_family_takes_its_best_held_out_lr_and_a_tie_the_lower():
    assert E.choose_lrs({"CE": {0.01: 0.2, 0.02: 0.3, 0.04: 0.1}, "FL": {0.01: 0.4, 0.02: 0.4, 0.04: 0.5}}) == {
        "CE": 0.02, "FL": 0.04}
    assert E.choose_lrs({"CE": {0.01: 0.3, 0.04: 0.3}}) == {"CE": 0.01}


def test_the_table_runs_b_and_d_seed_by_seed_then_the_rows_in_the_order_they_are_cut(tmp_path):
    lr_runs = {E.key(row, lr, 0, 8): {"stats": {"AP": ap}} for row, aps in (("b", (0.1, 0.3, 0.2)), ("d", (
        0.5, 0.4, 0.6))) for lr, ap in zip(E.LRS, aps)}
    (tmp_path / "ledger.json").write_text(json.dumps(lr_runs))
    plan = E.plan(types.SimpleNamespace(stage="table", ledger=tmp_path / "ledger.json", iters=8, rows=["g", "c", "d",
                                                                                                     "b"]))
    assert plan == [("b", 0.02, 0), ("d", 0.04, 0), ("b", 0.02, 1), ("d", 0.04, 1), ("b", 0.02, 2), ("d", 0.04, 2),
                    ("c", 0.02, 0), ("c", 0.02, 1), ("c", 0.02, 2), ("g", 0.02, 0), ("g", 0.02, 1)]


def test_given_lrs_and_one_seed_plan_a_block_of_runs_without_the_lr_stage(tmp_path):  # a block on a GPU, say
    a = types.SimpleNamespace(stage="table", ledger=tmp_path / "empty.json", iters=8, rows=["c", "d", "b"], lrs=None)
    assert E.plan(a) == []  # no LR stage in this ledger: the table waits for it
    a.lrs, a.seed = [0.01, 0.02], 1
    assert E.plan(a) == [("b", 0.01, 1), ("d", 0.02, 1), ("c", 0.01, 1)]  # CE rows CE's LR, FL rows FL's
    a.seed = None
    assert len(E.plan(a)) == 9
    run = {"stats": {"AP": 0.5}, "val": {"AP": 0.4}, "curve": []}
    out = E.tables({E.key("b", 0.01, 1, E.ITERS): run, E.key("d", 0.02, 2, E.ITERS): {**run, "val": {"AP": 0.5}}},
                   lrs={"CE": 0.01, "FL": 0.02})
    assert out["lrs"] == {"CE": 0.01, "FL": 0.02} and out["rows"]["b"]["seeds"] == 1
    assert "| (b) | CE, prior π = .01 | 30.2 | 0.89 | 0.01 | 1 | 0.400 | 0.80 |" in out["markdown"]


def test_study_chooses_on_held_out_pictures_reuses_lr_runs_and_never_reruns(tiny_shapes, tmp_path, monkeypatch):
    root = shutil.copytree(tiny_shapes, tmp_path / "set")
    (tmp_path / "backbone.pth").write_bytes(b"x")  # stands for study/pretrain.py's weights; TINY trains without them
    monkeypatch.setattr(dense, "BACKBONE", str(tmp_path / "backbone.pth"))
    monkeypatch.setattr(E, "HOLDOUT", 3)
    monkeypatch.setattr(E, "LRS", (0.02, 0.08))
    monkeypatch.setattr(E, "SEEDS", {"d": 1})  # (d): its LR run only; (b): a second seed
    trained, real = [], train.main
    monkeypatch.setattr(train, "main", lambda a: trained.append(a) or real(a))
    # Each run trains for real; its APs are then set so that held-out pictures pick one LR per family and the val
    # pictures would pick the other: the choice must be the held-out one
    held_ap = {("b", "0.02"): 0.30, ("b", "0.08"): 0.10, ("d", "0.02"): 0.20, ("d", "0.08"): 0.40}
    val_ap = {("b", "0.02"): 0.10, ("b", "0.08"): 0.30, ("d", "0.02"): 0.40, ("d", "0.08"): 0.20}
    current, real_run, real_evaluate = [], ablate.train_run, E.evaluate

    def train_run(out, flags):
        result = real_run(out, flags)
        current.append(("b" if flags[flags.index("--gamma") + 1] == "0" else "d", flags[flags.index("--lr") + 1]))
        return {**result, "stats": {**result["stats"], "AP": held_ap[current[-1]]}}

    monkeypatch.setattr(ablate, "train_run", train_run)
    monkeypatch.setattr(E, "evaluate", lambda model, ds: {**real_evaluate(model, ds), "AP": val_ap[current[-1]]})
    study = ["endpoint", "--iters", 8, "--data", root, "--out", tmp_path, "--ledger", tmp_path / "ledger.json",
             "--rows", "b", "d", f"--train-args={TINY} --log-every 1"]
    table = analyze.main(args(*study))
    assert table["lrs"] == {"CE": 0.02, "FL": 0.08}  # the held-out pictures' choice (val's: CE 0.08, FL 0.02)
    ledger = json.load(open(tmp_path / "ledger.json"))
    assert len(trained) == 5 and sorted(ledger) == sorted(
        [f"{r}/lr{lr:g}/seed0/8" for r in "bd" for lr in (0.02, 0.08)] + ["b/lr0.02/seed1/8"])
    held = json.load(open(D.holdout_split(root)[1]))
    assert all(a.val_ann.endswith("instances_train_holdout.json") for a in trained)  # decisions: held-out only
    assert {i["id"] for i in held["images"]}.isdisjoint(
        i["id"] for i in json.load(open(trained[0].train_ann))["images"])
    run = ledger["d/lr0.08/seed0/8"]
    assert [it for it, _ in E.curve(run)] == E.eval_points(8) and run["val"]["AP"] == 0.2 and "AP50" in run["val"]
    # the log is train.py's: at its first iteration every logit is still near the prior's, -log(99) (§3.3)
    assert run["log"]["iter"] == list(range(1, 9)) and run["log"]["scored_above_0.05"][0] == 0
    assert run["log"]["neg_logit"][0] == pytest.approx(-math.log(99), abs=0.05)
    assert table["rows"]["b"]["seeds"] == 2 and table["rows"]["d"]["seeds"] == 1
    assert analyze.main(args(*study)) == table and len(trained) == 5  # finished: never trained again
    assert analyze.main(args(*study, "--report-only")) == table
    shutil.rmtree(root)  # a clone without the set (data/ is not committed): the ledger is enough to report
    assert analyze.main(args(*study, "--report-only")) == table
    shutil.copytree(tiny_shapes, root)
    with pytest.raises(ValueError, match="b/lr0.08/seed0/8 was trained with other flags"):  # another study's
        analyze.main(args(*study[:-1], f"--train-args={TINY} --flip 0"))


def test_table_puts_each_row_beside_the_paper_relative_to_fl_gamma_2():
    def result(held, val=None, gain=0.0):
        it = E.ITERS
        r = {"stats": {"AP": held}, "curve": [{"iter": it * 6 // 8, "eval": {"AP": held - gain}},
                                             {"iter": it, "eval": {"AP": held}}]}
        return {**r, "val": {"AP": val}} if val is not None else r

    done = {E.key(row, lr, 0, E.ITERS): result(ap) for row, aps in (("b", (0.1, 0.2, 0.1)), ("d", (0.3, 0.2, 0.1)))
            for lr, ap in zip(E.LRS, aps)}
    done[E.key("b", 0.02, 0, E.ITERS)] = result(0.2, val=0.1, gain=0.05)  # still rising
    done[E.key("d", 0.01, 0, E.ITERS)] = result(0.3, val=0.4)
    done[E.key("d", 0.01, 1, E.ITERS)] = result(0.3, val=0.2)
    done[E.key("b", 0.04, 0, E.ITERS)] = {"diverged": "iteration 5: loss is nan"}
    out = E.tables(done)
    assert out["lrs"] == {"CE": 0.02, "FL": 0.01}  # each family its own best held-out LR
    assert "| (d) | FL γ = 2, α = .25 | 34.0 | 1.00 | 0.01 | 2 | 0.300 ± 0.141 | 1.00 | yes, yes |" in out["markdown"]
    assert "| (b) | CE, prior π = .01 | 30.2 | 0.89 | 0.02 | 1 | 0.100 | 0.33 | not reached (+0.050) |" in out[
        "markdown"]
    assert "| (d) held-out AP (gain over the last quarter) | 0.300 (+0.000) | 0.200 (+0.000) |" in out["lr_markdown"]
    assert out["lr_markdown"].splitlines()[2].endswith("| diverged |")  # (b) at 0.04: never chosen


def test_the_study_form_keeps_the_dense_recipes_imbalance_at_fewer_pixels(tmp_path):
    dense.make_dense(tmp_path, num_train=120, num_val=1)  # the dense set, smaller: same generator, same seed
    recipe = dense.imbalance(dense.training_view(tmp_path, dense.DENSE["min_size"]), dense.DENSE["anchor_sizes"])
    form = dense.imbalance(dense.training_view(tmp_path, E.SIZE), E.ANCHORS)
    assert E.SIZE < dense.DENSE["min_size"] and form["anchors_per_image"] < recipe["anchors_per_image"]
    for k in ("negative_samples_per_positive", "negative_anchors_per_positive"):
        assert form[k] == pytest.approx(recipe[k], rel=0.05)


def test_the_lr_table_names_each_runs_backbone():  # pretrain.py's weights differ from host to host
    run = {"stats": {"AP": 0.3}, "curve": []}
    done = {E.key("b", 0.04, 0, E.ITERS): {**run, "backbone": "889dc69fec2c"},
            E.key("d", 0.04, 0, E.ITERS): {**run, "backbone": "f727958e705c"}}
    line = E.tables(done)["lr_markdown"].splitlines()[-1]
    assert line == "| backbone, (b) / (d) | – / – | – / – | 889dc6 / f72795 |"


def test_the_study_starts_no_run_past_its_hours(tiny_shapes, tmp_path, monkeypatch):
    root = shutil.copytree(tiny_shapes, tmp_path / "set")
    (tmp_path / "backbone.pth").write_bytes(b"x")
    monkeypatch.setattr(dense, "BACKBONE", str(tmp_path / "backbone.pth"))
    monkeypatch.setattr(E, "HOLDOUT", 3)
    clock = iter(range(0, 10**9, 1000))  # a fake clock: every reading 1,000 s on, so a run takes 1,000 s
    monkeypatch.setattr(E, "time", types.SimpleNamespace(time=lambda: next(clock)))
    (tmp_path / "ledger.json").write_text(json.dumps({"b/lr0.01/seed0/2400": {"seconds": 3600 * 11.5}}))
    analyze.main(args("endpoint", "--stage", "lr", "--iters", 8, "--data", root, "--out", tmp_path, "--ledger",
                      tmp_path / "ledger.json", f"--train-args={TINY}"))
    ledger = json.load(open(tmp_path / "ledger.json"))
    # the pilot and one run: 11.5 h + 1,000 s = 11.78 h spent, under 12, but the next run would end at 12.06
    assert len(ledger) == 2 and ledger["b/lr0.04/seed0/8"]["seconds"] == 1000


def test_the_study_stops_before_a_run_that_would_end_past_its_hours():
    done = {E.key("b", 0.04, s, E.ITERS): {"seconds": 1800, "stats": {}} for s in range(22)}  # 11 h, 30 min a run
    done[E.key("b", 0.04, 22, E.ITERS)] = {"seconds": 0, "diverged": "iteration 1"}  # counts, but not in the mean
    done["b/lr0.04/seed0/2400"] = {"seconds": 1800}  # a pilot counts too: 11.5 hours
    assert E.study_hours(done, E.ITERS) == pytest.approx(12.0)  # the next run would end at 12: allowed
    done["d/lr0.04/seed0/2400"] = {"seconds": 60}
    assert E.study_hours(done, E.ITERS) > E.STUDY_HOURS

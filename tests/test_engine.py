"""engine.py's loop: a non-finite loss, gradient, weight or buffer stops the run at its last good checkpoint and
never reaches one; the log has each iteration once after a crash and a resume, and its first row shows the prior;
bfloat16 autocast trains as float32 does; the layout probe keeps the faster layout."""
import math
import os

import pytest
import torch

import engine
import infer
import train
import weights as W
from conftest import read_metrics, run
from loss import LossConfig


@pytest.mark.parametrize("poison,message", [
    (lambda cls_logits, losses: {k: v * float("nan") for k, v in losses.items()}, "loss is nan"),
    # + sqrt(0 * x): adds 0 to the loss and NaN to every gradient; in float32 the step would write NaN weights
    (lambda cls_logits, losses: {**losses, "cls": losses["cls"] + (0 * cls_logits.sum()).sqrt()},
     "gradient norm is nan with a finite loss")])
def test_non_finite_loss_or_gradients_stop_with_the_last_good_checkpoint(tiny_shapes, tmp_path, monkeypatch, poison,
                                                                          message):
    calls, train_loss = [], engine.retinanet_loss

    def poisoned(cls_logits, *args, **kw):
        calls.append(1)
        losses = train_loss(cls_logits, *args, **kw)
        return poison(cls_logits, losses) if len(calls) == 4 else losses

    monkeypatch.setattr(engine, "retinanet_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=rf"iteration 3: {message}.*checkpoint\.pt \(iteration 2\)"):
        run(tiny_shapes, out, iters=10, layout="nchw", **{"ckpt-every": "2"})  # nchw: no layout probe's calls
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_checkpoint_is_never_written_with_non_finite_weights(tiny_checkpoint):
    model = W.load_checkpoint(tiny_checkpoint)
    W.check_finite(model, 5, "x.pt (iteration 4)")  # finite: no error
    with torch.no_grad():
        model.box_head.out.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"iteration 5: box_head.out.bias is not finite.*x.pt \(iteration 4\)"):
        W.check_finite(model, 5, "x.pt (iteration 4)")


def test_a_non_finite_buffer_stops_the_run_at_its_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    # trainable BN trains on batch statistics: an inf running mean leaves the loss and gradients finite,
    # and only the check before each checkpoint can keep it out of one
    build = train.build_model

    def poisoned_model(*args, **kw):
        model, calls = build(*args, **kw), []

        def hook(module, inputs):
            calls.append(1)
            if len(calls) == 3:
                module.running_mean.fill_(float("inf"))

        model.backbone.bn1.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", poisoned_model)
    out = str(tmp_path / "buffer")
    with pytest.raises(FloatingPointError, match=r"iteration 4: backbone.bn1.running_mean is not finite.*iteration 2"):
        run(tiny_shapes, out, iters=10, layout="nchw", **{"ckpt-every": "2"})
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["iteration"] == 2


def test_metrics_after_a_resume_have_each_iteration_once(tiny_shapes, tmp_path, monkeypatch):
    straight = str(tmp_path / "a")
    run(tiny_shapes, straight, iters=6, layout="nchw", **{"no-eval": True})
    calls, train_loss = [], engine.retinanet_loss

    def crash_at_5(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("crash")
        return train_loss(*args, **kw)

    out = str(tmp_path / "b")
    monkeypatch.setattr(engine, "retinanet_loss", crash_at_5)
    with pytest.raises(FloatingPointError):  # iteration 4 logged, the checkpoint is at 3
        run(tiny_shapes, out, iters=6, layout="nchw", **{"ckpt-every": "3", "no-eval": True})
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3, 4]
    monkeypatch.setattr(engine, "retinanet_loss", train_loss)
    run(tiny_shapes, out, iters=6, resume=True, layout="nchw", **{"no-eval": True})
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(straight)]


def test_the_first_steps_log_shows_the_prior(tiny_shapes, tmp_path):
    """Iteration 1's row is the freshly initialised classifier's: every logit near the prior's, -log((1 - π) / π)
    = -log(99) (§3.3; the class subnet's N(0, 0.01) weights move it by a few hundredths), none scored above .05."""
    out = str(tmp_path / "prior")
    run(tiny_shapes, out, iters=2, **{"no-eval": True})
    first = read_metrics(out)[0]
    assert first["iter"] == 1 and first["scored_above_0.05"] == 0
    assert first["neg_logit"] == pytest.approx(-math.log(99), abs=0.05)
    assert first["pos_logit"] == pytest.approx(-math.log(99), abs=0.05)
    assert first["grad_norm"] > 0 and first["cls"] > 0


def test_bfloat16_autocast_trains_as_float32_does_with_float32_losses_and_weights(tiny_shapes, tmp_path):
    """--amp on a CPU: the network under bfloat16 autocast, the losses and the weights float32. Its first steps'
    losses are float32's to bfloat16's 8-bit mantissa (a few 1e-3 relative), not equal to them (autocast was on),
    and its gradient norm is logged (no loss scaler to hide it behind, unlike float16 on CUDA)."""
    rows, models = {}, {}
    for amp in ("off", "on"):
        out = str(tmp_path / amp)
        models[amp] = run(tiny_shapes, out, iters=2, amp=amp, **{"no-eval": True})["model"]
        rows[amp] = read_metrics(out)
    first, bf16 = rows["off"][0], rows["on"][0]  # the same weights and batch at iteration 1
    assert bf16["loss"] == pytest.approx(first["loss"], rel=2e-2) and bf16["loss"] != first["loss"]
    assert bf16["grad_norm"] == pytest.approx(first["grad_norm"], rel=5e-2)
    assert all(p.dtype == torch.float32 for p in models["on"].parameters())


def test_the_layout_probe_keeps_the_faster_layout_caches_it_and_leaves_the_run_untouched(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    model, cache = W.load_checkpoint(tiny_checkpoint).train(), str(tmp_path / "layouts.json")
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    nhwc, why = engine.probe_layout(model, LossConfig(), 2, cache=cache)  # real iterations, both layouts
    assert isinstance(nhwc, bool) and why.startswith("measured") and os.path.exists(cache)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics included
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream: its batches, its flips
    clock, seen = [0.0], []

    def fake_step(net, *args):  # channels-last takes 1 s here, NCHW 3 s
        fast = net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        seen.append(fast)
        clock[0] += 1.0 if fast else 3.0

    monkeypatch.setattr(engine, "forward_backward", fake_step)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    nhwc, why = engine.probe_layout(model, LossConfig(), 3, cache=cache)  # another batch: measured
    assert nhwc and seen == [False] * 3 + [True] * 3 and "3.000 s an iteration NCHW, 1.000 s channels-last" in why
    seen.clear()
    assert engine.probe_layout(model, LossConfig(), 3, cache=cache)[0] and not seen  # from the cache
    assert engine.probe_layout(model, LossConfig(), 3, amp=torch.bfloat16, cache=cache)[0] and seen


def spike_at(monkeypatch, call, factor):
    """The loss of the `call`-th iteration multiplied by factor: a bad batch's spike, its gradients too."""
    calls, train_loss = [], engine.retinanet_loss

    def spiked(*args, **kw):
        calls.append(1)
        losses = train_loss(*args, **kw)
        return {**losses, "cls": losses["cls"] * factor} if len(calls) == call else losses

    monkeypatch.setattr(engine, "retinanet_loss", spiked)


def test_a_loss_spike_goes_non_finite_unless_the_gradients_are_clipped(tiny_shapes, tmp_path, monkeypatch):
    """A spike of 1e10 at iteration 3: unclipped, its step throws the weights so far that the next loss is NaN and
    the run stops; with --clip-grad the step is bounded, the run ends finite, and grad_norm logs the norm
    before clipping (the spike's, far above the bound)."""
    spike_at(monkeypatch, 3, 1e10)
    with pytest.raises(FloatingPointError, match=r"iteration [34]: (loss|gradient norm) is (nan|inf)"):
        run(tiny_shapes, str(tmp_path / "raw"), iters=6, layout="nchw", **{"no-eval": True})  # nchw: no probe's calls
    spike_at(monkeypatch, 3, 1e10)
    out = str(tmp_path / "clipped")
    model = run(tiny_shapes, out, iters=6, layout="nchw", **{"no-eval": True, "clip-grad": "1.0"})["model"]
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[2]["grad_norm"] > 1e9 and all(torch.isfinite(p).all() for p in model.parameters())


def test_clipping_scales_every_gradient_by_max_norm_over_the_norm(tiny_checkpoint):
    """forward_backward's clipped gradients are the unclipped ones x max_norm / norm (torch's clip_grad_norm_ rule),
    and the norm it returns is the unclipped one."""
    model = W.load_checkpoint(tiny_checkpoint).train()
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    grads, norms = {}, {}
    for clip in (None, 0.01):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        values = engine.forward_backward(model, model.cfg, LossConfig(), images, targets, opt,
                                         torch.amp.GradScaler("cpu", enabled=False), {}, clip_grad=clip)
        grads[clip] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        norms[clip] = values["grad_norm"]
    assert norms[0.01] == pytest.approx(norms[None]) and norms[None] > 0.01
    for g, g_clipped in zip(grads[None], grads[0.01]):
        torch.testing.assert_close(g_clipped, g * (0.01 / (norms[None] + 1e-6)), rtol=1e-4, atol=1e-9)


def test_eval_at_keeps_the_best_checkpoint_beside_the_last(tiny_shapes, tmp_path, monkeypatch):
    """With --eval-at, best.pt holds the weights of the best evaluation so far, with its iteration and numbers:
    here AP is made to peak at iteration 2 of 4, so best.pt is iteration 2's and checkpoint.pt iteration 4's; both
    load for infer.py and --finetune. A resumed run knows the best so far from its log; a fresh one drops the old."""
    def evaluations(*aps):
        it = iter(aps)
        monkeypatch.setattr(engine, "evaluate", lambda *a, **kw: {**dict.fromkeys(engine.STATS, 0.0), "AP": next(it),
                                                                  "per_class": []})

    evaluations(0.5, 0.2, 0.3)  # at 2, 3 and the end, 4
    out = str(tmp_path / "best")
    run(tiny_shapes, out, iters=4, **{"eval-at": "2 3"})
    best, last = (torch.load(os.path.join(out, f), weights_only=True) for f in ("best.pt", "checkpoint.pt"))
    assert (best["iteration"], best["eval"]["AP"], last["iteration"]) == (2, 0.5, 4)
    assert not torch.equal(best["model"]["box_head.out.weight"], last["model"]["box_head.out.weight"])
    assert infer.load_model(os.path.join(out, "best.pt")).cfg.num_classes == 4
    evaluations(0.45)  # resumed to 6: below iteration 2's 0.5, which the log remembers
    run(tiny_shapes, out, iters=6, resume=True, **{"eval-at": "2 3"})
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["iteration"] == 2
    ft = run(tiny_shapes, str(tmp_path / "ft"), iters=0, finetune=os.path.join(out, "best.pt"), **{"no-eval": True})
    assert torch.equal(ft["model"].state_dict()["box_head.out.weight"], best["model"]["box_head.out.weight"])
    evaluations()
    run(tiny_shapes, out, iters=1, **{"no-eval": True})  # a fresh run in the same folder
    assert not os.path.exists(os.path.join(out, "best.pt"))


def test_under_the_float16_loss_scaler_an_overflow_with_clipping_is_skipped_not_fatal(tiny_checkpoint, monkeypatch):
    """float16 AMP's GradScaler (here on the CPU) overflows now and then by design: with --clip-grad the gradients
    are unscaled first and their norm is infinite, and the step must be the scaler's to skip (weights unchanged,
    a lower scale), not a stopped run; without the scaler the same norm stops it."""
    spike_at(monkeypatch, 1, 1e36)  # x the scaler's 65,536: past float32's range, the gradients inf
    model = W.load_checkpoint(tiny_checkpoint).train()
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    values = engine.forward_backward(model, model.cfg, LossConfig(), images, targets, opt, scaler, {}, clip_grad=1.0)
    assert math.isfinite(values["loss"]) and not math.isfinite(values["grad_norm"])
    engine.stop_if_not_finite(values, 0, "x.pt", scaler_skips=True)  # no error
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and scaler.get_scale() < 65536
    with pytest.raises(FloatingPointError, match="gradient norm is (inf|nan) with a finite loss"):
        engine.stop_if_not_finite(values, 0, "x.pt")

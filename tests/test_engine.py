"""engine.py's loop: a non-finite loss, gradient, weight or buffer stops the run at its last good checkpoint and
never reaches one; the log has each iteration once after a crash and a resume, and its first row shows the prior;
bfloat16 autocast trains as float32 does; the layout probe keeps the faster layout."""
import math
import os

import pytest
import torch

import engine
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
        run(tiny_shapes, out, iters=10, **{"ckpt-every": "2"})
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
        run(tiny_shapes, out, iters=10, **{"ckpt-every": "2"})
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["iteration"] == 2


def test_metrics_after_a_resume_have_each_iteration_once(tiny_shapes, tmp_path, monkeypatch):
    straight = str(tmp_path / "a")
    run(tiny_shapes, straight, iters=6, **{"no-eval": True})
    calls, train_loss = [], engine.retinanet_loss

    def crash_at_5(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("crash")
        return train_loss(*args, **kw)

    out = str(tmp_path / "b")
    monkeypatch.setattr(engine, "retinanet_loss", crash_at_5)
    with pytest.raises(FloatingPointError):  # iteration 4 logged, the checkpoint is at 3
        run(tiny_shapes, out, iters=6, **{"ckpt-every": "3", "no-eval": True})
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3, 4]
    monkeypatch.setattr(engine, "retinanet_loss", train_loss)
    run(tiny_shapes, out, iters=6, resume=True, **{"no-eval": True})
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

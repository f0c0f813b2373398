"""The optimiser step both yardstick trainings share (tokprune.yardstick.train_loop.OptimStep)."""

import pytest
import torch

from tokprune.yardstick import train_loop
from tokprune.yardstick.train_config import RunState, TrainConfig


def _stepper(compiled=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    ema = [p.detach().clone() for p in params]
    tc = TrainConfig(out="unused", device="cpu", lr=0.1, warmup=0, ema=0.5)
    return model, train_loop.OptimStep(model, opt, params, ema, tc, RunState(), compiled)


def test_a_step_updates_weights_ema_and_the_step_count():
    model, stepper = _stepper()
    before = model.weight.detach().clone()

    def loss_fn():
        loss = model(torch.ones(2, 4)).pow(2).mean()
        loss.backward()
        return loss

    assert stepper.step(loss_fn, 0.0) is not None
    assert stepper.state.dit_step == 1
    assert not torch.equal(model.weight, before)
    assert not torch.equal(stepper.ema[0], before)  # EMA moved towards the new weights


def test_a_compiler_failure_falls_back_to_eager_and_redoes_the_step(monkeypatch):
    model, stepper = _stepper(compiled=True)
    undone = []
    monkeypatch.setattr(train_loop, "_compile_blocks", lambda tr, undo=False: undone.append(undo) or False)
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor failed")
        loss = model(torch.ones(2, 4)).sum()
        loss.backward()
        return loss

    assert stepper.step(loss_fn, 0.0) is not None
    assert len(calls) == 2 and undone == [True] and stepper.compiled is False and stepper.state.dit_step == 1
    with pytest.raises(RuntimeError, match="eager failure"):  # without a compile, a failure is the model's own
        stepper.step(lambda: (_ for _ in ()).throw(RuntimeError("eager failure")), 0.0)


def test_non_finite_gradients_skip_the_step_then_stop_the_run():
    model, stepper = _stepper()

    def nan_loss():
        loss = model(torch.ones(2, 4)).sum() * float("nan")
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    assert stepper.step(nan_loss, 0.0) is None
    assert torch.equal(model.weight, before) and stepper.state.dit_step == 0
    with pytest.raises(FloatingPointError, match="lower --lr"):
        for _ in range(25):
            stepper.step(nan_loss, 0.0)

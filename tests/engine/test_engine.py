"""The engine's contract on its own, with a toy trainer: resume inside an epoch is bit-identical,
checkpoints round-trip, the schedule is §6.1's poly LR, bad loaders are refused by name."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyamalgam.engine import (Engine, PhaseState, PolyLR, RunLog, batch_len, load_checkpoint, plan_steps,
                              save_checkpoint)


def _setup(seed=0):
    g = torch.Generator().manual_seed(0)  # the same data whatever the seed of the weights
    data = TensorDataset(torch.randn(40, 3, generator=g), torch.randn(40, 1, generator=g))
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))  # dropout: the global RNG matters

    def step_loss(module, batch):
        x, y = batch
        loss = (module(x) - y).square().mean()
        return loss, {"mse": loss}

    return net, loader, step_loss


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("stop_at", [3, 10, 17])  # inside epoch 1, at an epoch end, inside epoch 2
def test_a_phase_resumed_from_a_mid_phase_state_matches_an_uninterrupted_one(tmp_path, optimizer, stop_at):
    total = 25
    net, loader, step_loss = _setup()
    engine = Engine(device="cpu", optimizer=optimizer, lr=0.05, progress=False)
    full = engine.run_phase(net, step_loss, loader, total)
    want = copy.deepcopy(net.state_dict())

    net, loader, step_loss = _setup()

    class Stop(Exception):
        pass

    def save(state):
        if state.step == stop_at:  # write the trainer's checkpoint, then "crash"
            tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
            save_checkpoint(tmp_path / "last.safetensors", tensors, state.to_meta(tensors))
            raise Stop

    engine = Engine(device="cpu", optimizer=optimizer, lr=0.05, progress=False, checkpoint_every=1)
    with pytest.raises(Stop):
        engine.run_phase(net, step_loss, loader, total, save=save)
    torch.manual_seed(123)  # whatever the process drew since: resume restores the generators

    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    state = PhaseState.from_meta(meta, tensors)
    assert state.step == stop_at and state.total == total
    net, loader, step_loss = _setup(seed=5)  # other initial weights: the checkpoint overrides them
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
    engine = Engine(device="cpu", optimizer=optimizer, lr=0.05, progress=False)  # as in a new process
    engine.restore_rng(state.rng, loader)
    resumed = engine.run_phase(net, step_loss, loader, total, resume=state)
    for k, v in net.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert resumed.losses == pytest.approx(full.losses, rel=0, abs=0)


def test_poly_lr_follows_section_6_1():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = PolyLR(opt, total_steps=10, power=0.9)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:11] == pytest.approx([0.5 * (1 - s / 10) ** 0.9 for s in range(11)])
    assert lrs[11] == 0.0  # past the end it stays at zero instead of going negative or complex


def test_the_logged_mean_is_over_the_last_epoch():
    net, loader, step_loss = _setup()
    seen = []

    def recording(module, batch):
        loss, terms = step_loss(module, batch)
        seen.append(float(loss.detach()))
        return loss, terms

    run = Engine(device="cpu", lr=0.01, progress=False).run_phase(net, recording, loader, 15, on_step=None)
    assert len(loader) == 10
    assert run.losses["mse"] == pytest.approx(sum(seen[5:]) / 10)
    assert run.images == 15 * 4


def test_plan_steps_checks_its_arguments():
    _, loader, _ = _setup()
    assert plan_steps(loader, 2, None) == 20 and plan_steps(loader, 2, 7) == 7
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        plan_steps(loader, 0, None)
    with pytest.raises(ValueError, match="max_steps"):
        plan_steps(loader, 1, True)
    with pytest.raises(TypeError, match="re-iterable"):
        plan_steps(iter(loader), 1, None)
    with pytest.raises(ValueError, match="loader is empty"):
        plan_steps([], 1, None)
    with pytest.raises(ValueError, match="optimizer"):
        Engine(device="cpu", optimizer="rmsprop")
    with pytest.raises(ValueError, match="checkpoint_every"):
        Engine(device="cpu", checkpoint_every=0)


def test_the_run_log_appends_json_lines(tmp_path):
    log = RunLog(tmp_path, "x.jsonl")
    log.write({"event": "a", "losses": {"l": 1.0}}, step=1)
    log.write({"event": "b"})
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["event"] for line in lines] == ["a", "b"]
    assert [r["event"] for r in log.history] == ["a", "b"]
    RunLog(None).write({"event": "c"})  # in memory only: nothing written anywhere


def test_batch_len_reads_every_batch_layout():
    x = torch.zeros(5, 3, 2, 2)
    assert batch_len(x) == batch_len((x, 1)) == batch_len({"image": x}) == 5


def test_a_run_resumed_between_two_phases_continues_the_loaders_shuffle():
    """DataLoader(generator=...) shuffles with its own generator: its state is part of the RNG state."""
    net, loader, step_loss = _setup()
    engine = Engine(device="cpu", lr=0.05, progress=False)
    engine.run_phase(net, step_loss, loader, 13, index=1)
    between = copy.deepcopy(net.state_dict()), engine.rng_state()
    engine.run_phase(net, step_loss, loader, 13, index=2)
    want = copy.deepcopy(net.state_dict())

    net, loader, step_loss = _setup(seed=5)  # a new process: fresh loader generator, other weights
    net.load_state_dict(between[0])
    engine = Engine(device="cpu", lr=0.05, progress=False)
    engine.restore_rng(between[1], loader)
    engine.run_phase(net, step_loss, loader, 13, index=2)
    for k, v in net.state_dict().items():
        assert torch.equal(v, want[k]), k

"""Non-finite training stops at its first NaN/inf step, names where, and never checkpoints it.

Before: a teacher with NaN weights, NaN images or a diverging learning rate let
``Amalgamator.fit()`` finish with an all-NaN loss table (and NaN checkpoints); the error came only
at ``branch_out()`` ("all candidate losses of 'seg' are NaN", the wrong output) and the demo
exited 2, "bad arguments".
"""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader, tiny_teachers
from pyamalgam.engine import Engine, NonFiniteLossError, load_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _poison(net, value=math.nan):
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def _all_finite(path) -> bool:
    tensors, _ = load_checkpoint(path)
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_a_nan_teacher_stops_fit_at_block_1_naming_its_output_and_teacher(tmp_path):
    teachers = tiny_teachers()  # the student copies "seg" (init="teacher"): poison the other one
    _poison(teachers["depth"])
    am = Amalgamator(teachers, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    with pytest.raises(NonFiniteLossError) as err:
        am.fit(tiny_loader(), 1)
    message = str(err.value)
    assert "block 1 of 6" in message and "step 1" in message
    assert "output 'depth' (teacher 'depth') = nan" in message and "teacher(s) ['depth']" in message
    assert "'seg' (teacher" not in message  # the healthy teacher is not blamed
    assert err.value.step == 1 and set(err.value.terms) == {"loss", "depth"}
    assert isinstance(err.value, FloatingPointError)  # the command line's "failed run" (exit code 1)
    assert not (tmp_path / "last.safetensors").exists()  # stopped before its first checkpoint
    assert am.completed_blocks == set() and am.loss_table["depth"] == {}


def test_nan_images_stop_at_the_first_step_and_blame_every_output():
    images = torch.full((8, 3, 32, 40), math.nan)
    am = Amalgamator(tiny_teachers(), progress=False)
    with pytest.raises(NonFiniteLossError) as err:
        am.fit(DataLoader([{"image": x} for x in images], batch_size=4), 1)
    message = str(err.value)
    assert "block 1 of 6" in message and "output 'seg' (teacher 'seg')" in message
    assert "output 'depth' (teacher 'depth')" in message and "check the images" in message
    # checked before backward: the NaN step never reached the parameters (its forward pass did reach
    # the BatchNorm statistics, which is why no checkpoint is written after it)
    assert all(torch.isfinite(p).all() for p in [*am.student.parameters(), *am.codings.parameters()])


def test_a_diverging_learning_rate_stops_before_a_checkpoint_holds_non_finite_weights(tmp_path):
    am = Amalgamator(tiny_teachers(), lr=1e30, momentum=0.0, checkpoint_dir=tmp_path, checkpoint_every=1,
                     progress=False)
    with pytest.raises(NonFiniteLossError) as err:
        am.fit(tiny_loader(), 1)
    assert "fit, block 1 of 6" in str(err.value) and "lower lr (now 1e+30)" in str(err.value)
    assert err.value.step >= 2  # step 1 is finite; its update diverges
    assert _all_finite(tmp_path / "last.safetensors")  # the last checkpoint written is a finite one


def test_a_nan_during_finetune_names_the_finetune():
    am = Amalgamator(tiny_teachers(), progress=False)
    loader = tiny_loader(n=4)
    am.fit(loader, 1, max_steps_per_block=1)
    am.branch_out()
    _poison(am.target_net.branches["depth"])
    with pytest.raises(NonFiniteLossError, match=r"finetune \(Step 4\): non-finite loss at step 1: output 'depth'"):
        am.finetune(loader, 1)


def test_non_finite_final_losses_of_eq7_are_refused_at_their_block(monkeypatch):
    am = Amalgamator(tiny_teachers(), progress=False)
    real = Amalgamator._final_losses

    def poisoned(self, n, step_module, probe):
        losses = real(self, n, step_module, probe)
        return {**losses, "seg": math.inf} if n == 2 else losses

    monkeypatch.setattr(Amalgamator, "_final_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"block 2 of 6 .*final losses.*output 'seg' \(teacher 'seg'\) = inf"):
        am.fit(tiny_loader(n=4), 1, max_steps_per_block=1)
    assert am.completed_blocks == {1} and 2 not in am.loss_table["seg"]  # never a NaN/inf table for Eq. 7


def test_the_teacher_trainer_stops_through_the_engine():
    from pyamalgam.data import SyntheticScenes
    from pyamalgam.teachers import train_teacher

    seen = []
    with pytest.raises(NonFiniteLossError, match=r"teacher seg: the loss became non-finite at step \d+ of 20.*lower lr"):
        train_teacher("seg", SyntheticScenes("train", size=4, resolution=(32, 32)), steps=20, batch_size=2,
                      lr=1e30, optimizer="sgd", width=1 / 16, depth=3, num_bins=8, device="cpu", progress=False,
                      callback=lambda step, loss: seen.append(loss))
    assert seen and all(math.isfinite(v) for v in seen)  # the callback never saw the non-finite loss


# ---------------------------------------------------------------------------- the engine's guard

def _toy(bad_step, term="b"):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    data = [(torch.rand(2, 3), torch.rand(2, 1)) for _ in range(8)]
    calls = {"n": 0}

    def step_loss(module, batch):
        x, y = batch
        a = (module(x) - y).square().mean()
        b = a * 0 + (math.nan if calls["n"] == bad_step else 0.0)
        calls["n"] += 1
        return a + b if term == "b" else a, {"a": a, "b": b}

    return net, DataLoader(data, batch_size=None), step_loss


def test_checked_every_4_steps_the_guard_still_names_the_first_bad_step_and_term():
    net, loader, step_loss = _toy(bad_step=1)
    engine = Engine(device="cpu", checkpoint_every=3, progress=False, check_finite_every=4)
    saves = []
    with pytest.raises(NonFiniteLossError) as err:
        engine.run_phase(net, step_loss, loader, 8, save=saves.append, desc="toy")
    assert err.value.step == 2 and set(err.value.terms) == {"loss", "b"}  # not "a": NaN there only from step 3
    assert saves == []  # checked before the step-3 checkpoint, which would have held NaN weights
    assert "toy: the loss became non-finite at step 2 of 8 (loss = nan, b = nan)" in str(err.value)


def test_weights_that_became_non_finite_are_never_checkpointed():
    net, loader, _ = _toy(bad_step=-1)

    def step_loss(module, batch):  # finite losses, but the update leaves an inf weight behind
        x, y = batch
        loss = (module(x) - y).square().mean()
        with torch.no_grad():
            module.bias.fill_(math.inf)
        return loss * 0, {"a": loss * 0}

    saves = []
    with pytest.raises(NonFiniteLossError, match=r"toy: bias hold non-finite values after step 1 of 8"):
        Engine(device="cpu", checkpoint_every=1, progress=False).run_phase(net, step_loss, loader, 8,
                                                                           save=saves.append, desc="toy")
    assert saves == []


def test_check_finite_every_is_validated():
    with pytest.raises(ValueError, match="check_finite_every must be a positive int"):
        Engine(device="cpu", check_finite_every=0)


def test_the_demo_exits_1_naming_the_block_output_and_teacher(tmp_path, capsys):
    from pyamalgam.cli import main

    tiny = {"resolution": "32x32", "width": "0.0625", "depth": "3", "num_bins": "8", "train_size": "8",
            "unlabelled_size": "8", "test_size": "2", "batch_size": "4", "teacher_steps": "2", "block_steps": "2",
            "finetune_steps": "2", "probe_images": "4", "eval_batch": "4", "figure_samples": "1",
            "amalgam_optimizer": "sgd", "amalgam_lr": "1e30"}
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    code = main(["demo", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(tmp_path), *sets])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "failed: fit, block 1 of 6 (Eq. 6/8/9): non-finite loss at step" in err and "lower lr (now 1e+30)" in err

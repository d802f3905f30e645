"""Checkpoints and resume: a Distiller run interrupted anywhere, even by ``kill -9`` in the middle of
an epoch, ends with the uninterrupted run's weights (student, connector, critic) and logged
losses bit for bit; a checkpoint of another setup, another plan or a corrupt file is refused
before anything changes."""
import json
from pathlib import Path

import pytest
import torch
from _distill_cases import Scenes, digest_all, distiller, loader
from torch.utils.data import DataLoader

from pyamalgam._testing import FailingAt, Interrupt, checkpoint_step, kill_9_then_resume
from pyamalgam.engine import CorruptFileError, load_checkpoint, save_checkpoint

HERE = Path(__file__).parent
EPOCHS, N = 2, 16  # 4 steps an epoch, 8 steps
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from _distill_cases import digest_all, distiller, loader
d = distiller(sys.argv[1], checkpoint_every=1)
steps = []
d.teacher.head.register_forward_hook(lambda *a: steps.append(1))  # the steps this process trains
d.fit(loader(n=16, delay=float(sys.argv[3])), 2)
with open(sys.argv[1] + "/result.json", "w") as f:
    json.dump({**digest_all(d), "losses": d.history[-1]["losses"], "steps": len(steps)}, f)
"""


def run(checkpoint_dir=None, data=None, **kwargs):
    d = distiller(checkpoint_dir, checkpoint_every=1, **kwargs)
    d.steps = []
    d.teacher.head.register_forward_hook(lambda *a: d.steps.append(1))  # the steps this run trains
    d.fit(data if data is not None else loader(n=N), EPOCHS)
    return d


@pytest.fixture(scope="module")
def reference():
    d = run()
    return {**digest_all(d), "losses": d.history[-1]["losses"]}


def result(d):
    return {**digest_all(d), "losses": d.history[-1]["losses"]}


def _Failing(at):
    return FailingAt(Scenes(N), at)


# item 11: step 3 of epoch 1; 17: the first step of epoch 2 (the checkpoint after an epoch's last
# batch); 27: step 7, inside epoch 2
@pytest.mark.parametrize("at", [11, 17, 27])
def test_resume_after_an_interruption_is_bit_identical(tmp_path, reference, at):
    failing = DataLoader(_Failing(at), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    with pytest.raises(Interrupt):
        run(tmp_path, failing)
    checkpointed = checkpoint_step(tmp_path / "last.safetensors")
    resumed = run(tmp_path)
    assert result(resumed) == reference
    assert len(resumed.steps) == 8 - checkpointed < 8  # it went on from the checkpoint, not from scratch
    log = [json.loads(line) for line in (tmp_path / "distill.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["distill"] and log[0]["losses"] == reference["losses"]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, reference, pyamalgam_env):
    killed_at, got = kill_9_then_resume(CHILD, tmp_path, HERE, at=5, total=8, delay=0.03,  # inside epoch 2
                                        env=pyamalgam_env, timeout=120)
    assert got.pop("steps") == 8 - killed_at  # resumed from the last checkpoint
    assert got == reference


def test_a_checkpoint_holds_the_student_connector_critic_optimizer_and_rng(tmp_path):
    failing = DataLoader(_Failing(11), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    with pytest.raises(Interrupt):
        run(tmp_path, failing)
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert (meta["phase"], meta["step"], meta["total"], meta["steps"]) == ("train", 2, 8, 8)
    assert {"optimizer", "scheduler", "rng", "epoch_rng", "sums"} <= set(meta)
    assert any(k.startswith("student/blocks.") for k in tensors)
    assert "terms/cwd.connector.conv.weight" in tensors and "ho/mom_w" in tensors
    assert set(meta["config"]["terms"]) == {"pi", "pa", "cwd", "ho"}
    assert meta["config"]["terms"]["pa"]["student"] == ["block", 6]


def test_a_finished_run_is_restored_not_trained_again(tmp_path, reference):
    run(tmp_path)
    d = run(tmp_path)  # fit(resume=True) finds the 'done' checkpoint
    assert result(d) == reference and len(d.history) == 1


def test_resume_refuses_another_setup_or_plan_before_changing_anything(tmp_path):
    run(tmp_path, loader(n=4))
    with pytest.raises(ValueError, match="was written by a different setup"):
        distiller(tmp_path, terms={"pi": 10.0}).fit(loader(n=4), EPOCHS)
    with pytest.raises(ValueError, match="different setup"):
        distiller(tmp_path, lr=0.02).fit(loader(n=4), EPOCHS)
    d = distiller(tmp_path)
    before = digest_all(d)
    with pytest.raises(ValueError, match="a run of 2 steps, this fit plans 3"):
        d.fit(loader(n=4), 3)
    assert digest_all(d) == before


def test_resume_refuses_another_teacher(tmp_path):
    run(tmp_path, loader(n=4))
    d = distiller(tmp_path)
    with torch.no_grad():
        d.teacher.head.conv.bias.add_(1.0)
    d._teacher_digest = __import__("pyamalgam.distill.setup", fromlist=["digest"]).digest(d.teacher)
    with pytest.raises(ValueError, match="different setup"):
        d.fit(loader(n=4), EPOCHS)


@pytest.mark.parametrize("damage", ["phase", "history", "tensor", "step"])
def test_a_corrupt_checkpoint_is_refused_by_name_and_changes_nothing(tmp_path, damage):
    failing = DataLoader(_Failing(11), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    with pytest.raises(Interrupt):
        run(tmp_path, failing)
    path = tmp_path / "last.safetensors"
    tensors, meta = load_checkpoint(path)
    meta.pop("format")
    if damage == "phase":
        meta["phase"] = "blocks"
    elif damage == "history":
        meta["history"] = {"event": 1}
    elif damage == "tensor":
        tensors["terms/cwd.connector.conv.weight"] = torch.zeros(3, 3)
    else:
        meta["step"] = None
    save_checkpoint(path, tensors, meta)
    d = distiller(tmp_path, checkpoint_every=1)
    before = digest_all(d)
    with pytest.raises(CorruptFileError, match="last.safetensors"):
        d.fit(loader(n=N), EPOCHS)
    assert digest_all(d) == before

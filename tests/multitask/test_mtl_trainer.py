"""The multi-task trainer on the engine: it trains every row's objective, logs, checkpoints and
resumes bit for bit (an interruption in-process, and ``kill -9`` of a child process), refuses
another setup, and gives clear errors for inconsistent task sets."""
import json
from pathlib import Path

import pytest
import torch
from _mtl_cases import Labelled, digest, loader, tiny_mtl
from torch.utils.data import DataLoader

from pyamalgam._testing import (
    FailingAt,
    Interrupt,
    checkpoint_step,
    kill_9_then_resume,
    tiny_net,
)
from pyamalgam.multitask import MultiTaskTrainer, SelfDistillation

HERE = Path(__file__).parent
SD = SelfDistillation("encoder", "star2", full=True)


def trainer(checkpoint_dir=None, sd=SD, **kwargs):
    kwargs.setdefault("progress", False)
    net = tiny_mtl(shallow=sd is not None)
    return MultiTaskTrainer(net, sd=sd, checkpoint_dir=checkpoint_dir, checkpoint_every=1, **kwargs)


def teachers():
    return {"seg": tiny_net("segmentation", 5, depth=2, num_classes=4, num_bins=8, name="seg"),
            "depth": tiny_net("depth", 6, depth=2, num_classes=4, num_bins=8, name="depth")}


@pytest.mark.parametrize("kwargs", [{"sd": None}, {"sd": SelfDistillation("decoder", "star")},
                                    {"sd": None, "teachers": "kd"}, {"weighting": "uncertainty"},
                                    {"weighting": "dwa"}])
def test_every_configuration_trains_and_logs(tmp_path, kwargs):
    if kwargs.get("teachers") == "kd":
        kwargs = {**kwargs, "teachers": teachers()}
    tr = trainer(tmp_path, **kwargs)
    before = digest(tr)
    net = tr.fit(loader(), 1)
    assert not net.training and digest(tr) != before
    record = json.loads((tmp_path / "mtl.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "mtl" and record["steps"] == 2
    assert {"seg/label", "depth/label", "normal/label", "total"} <= set(record["losses"])
    assert ("kd" in record["losses"]) == ("teachers" in kwargs)
    assert ("sd/feature" in record["losses"]) == (kwargs.get("sd", SD) is not None)


@pytest.fixture(scope="module")
def reference():
    tr = trainer(weighting="dwa")
    tr.fit(loader(), 2)
    return digest(tr), tr.history[-1]["losses"]


@pytest.mark.parametrize("at", [7, 14])  # inside epoch 1; inside epoch 2 (DWA's state is checkpointed too)
def test_resume_after_an_interruption_is_bit_identical(tmp_path, reference, at):
    failing = DataLoader(FailingAt(Labelled(8), at), batch_size=4, shuffle=True,
                         generator=torch.Generator().manual_seed(1))
    with pytest.raises(Interrupt):
        trainer(tmp_path, weighting="dwa").fit(failing, 2)
    step = checkpoint_step(tmp_path / "last.safetensors")
    assert 0 < step < 4
    tr = trainer(tmp_path, weighting="dwa")
    tr.fit(loader(), 2)
    assert (digest(tr), tr.history[-1]["losses"]) == reference


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from _mtl_cases import digest, loader, tiny_mtl
from pyamalgam.multitask import MultiTaskTrainer, SelfDistillation
net = tiny_mtl(shallow=True)
tr = MultiTaskTrainer(net, sd=SelfDistillation("encoder", "star2", full=True), weighting="dwa",
                      checkpoint_dir=sys.argv[1], checkpoint_every=1, progress=False)
tr.fit(loader(delay=float(sys.argv[3])), 2)
with open(sys.argv[1] + "/result.json", "w") as f:
    json.dump({"digest": digest(tr), "losses": tr.history[-1]["losses"]}, f)
"""


@pytest.mark.slow  # two child processes (as tests/distill's kill -9 test)
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, reference, pyamalgam_env):
    # killed past the first epoch (2 steps of 4); long timeouts for a loaded machine
    _, got = kill_9_then_resume(CHILD, tmp_path, HERE, at=2, total=4, delay=0.25, env=pyamalgam_env, timeout=600)
    assert (got["digest"], got["losses"]) == reference


def test_resume_refuses_another_setup(tmp_path):
    trainer(tmp_path).fit(loader(n=4), 1)
    with pytest.raises(ValueError, match="was written by a different setup"):
        trainer(tmp_path, sd=SelfDistillation("encoder", "star")).fit(loader(n=4), 1)
    tr = trainer(tmp_path)
    with pytest.raises(ValueError, match="a run of 1 steps, this fit plans 2"):
        tr.fit(loader(n=4), 2)


def test_inconsistent_task_sets_are_clear_errors():
    with pytest.raises(ValueError, match="needs the network's S paths"):
        MultiTaskTrainer(tiny_mtl(), sd=SD, progress=False)
    with pytest.raises(ValueError, match=r"teachers\['normal'\] must be a single-task network declaring the task "
                                         r"'normal'; it declares \['seg'\]"):
        MultiTaskTrainer(tiny_mtl(), teachers={"normal": teachers()["seg"]}, progress=False)
    with pytest.raises(ValueError, match=r"teachers\['seg'\]: not a task of the network \(its tasks: \['depth'\]\)"):
        MultiTaskTrainer(tiny_mtl(("depth",)), teachers={"seg": teachers()["seg"]}, progress=False)
    with pytest.raises(TypeError, match="must be a pyamalgam.models.multitask.MultiTaskNet"):
        MultiTaskTrainer(tiny_net("segmentation"), progress=False)
    with pytest.raises(ValueError, match="weighting must be one of"):
        MultiTaskTrainer(tiny_mtl(), weighting="gradnorm", progress=False)
    tr = MultiTaskTrainer(tiny_mtl(), progress=False)
    no_normals = [{k: v for k, v in b.items() if k != "normal"} for b in loader()]
    with pytest.raises(KeyError, match=r"the batch has no label for \['normal'\]"):
        tr.fit(no_normals, 1)

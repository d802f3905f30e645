"""`pyamalgam train-teacher`: a checkpoint that load_teacher and the Amalgamator accept."""
import json

import pytest
import torch

from pyamalgam.amalgamation import Amalgamator
from pyamalgam.cli import main
from pyamalgam.data import SyntheticScenes
from pyamalgam.teachers import load_teacher

TINY = ["--steps", "3", "--resolution", "32x32", "--size", "4", "--batch-size", "2", "--width", "0.0625",
        "--num-bins", "8", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for task in ("seg", "depth"):
        paths[task] = root / f"{task}.safetensors"
        assert main(["train-teacher", "--task", task, "--out", str(paths[task]), *TINY]) == 0
    return paths


def test_checkpoint_files_and_summary(teachers, tmp_path, capsys):
    for path in teachers.values():
        assert path.is_file() and path.with_suffix(".json").is_file()
    out = tmp_path / "normal.safetensors"
    assert main(["train-teacher", "--task", "normal", "--out", str(out), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "normal" and summary["steps"] == 3 and summary["weights"] == str(out)
    assert summary["parameters"] > 0 and all(isinstance(summary[k], float) for k in ("loss_first", "loss_final"))


def test_load_teacher_rebuilds_the_network(teachers):
    x = SyntheticScenes("test", size=2, resolution=(32, 32))[0]["image"][None]
    seg, depth = load_teacher(teachers["seg"]), load_teacher(teachers["depth"])
    assert seg(x).shape == (1, SyntheticScenes.num_classes, 32, 32)
    out = depth(x)
    assert out.shape[-2:] == (32, 32) and torch.isfinite(out).all() and (out > 0).all()
    assert seg.train_record["steps"] == 3 and len(seg.train_record["losses"]) == 3


def test_amalgamator_accepts_trained_teachers(teachers):
    nets = {task: load_teacher(path) for task, path in teachers.items()}
    images = SyntheticScenes("unlabelled", size=4, resolution=(32, 32))
    loader = torch.utils.data.DataLoader([images[i] for i in range(4)], batch_size=2)
    am = Amalgamator(nets, progress=False, lr=0.01)
    am.fit(loader, 1, max_steps_per_block=1)
    points = am.branch_out()
    target = am.finetune(loader, 1, max_steps=1)
    out = target.eval()(images[0]["image"][None])
    assert set(out) == {"seg", "depth"} and set(points) == {"seg", "depth"}
    assert all(torch.isfinite(v).all() for v in out.values())

"""`pyamalgam train-teacher`: a checkpoint that load_teacher and the Amalgamator accept; TeacherRecord."""
import dataclasses
import json

import pytest
import torch

from pyamalgam.amalgamation import Amalgamator
from pyamalgam.cli import main
from pyamalgam.data import SyntheticScenes
from pyamalgam.teachers import (
    Teacher,
    TeacherRecord,
    build_teacher,
    load_teacher,
    save_teacher,
    train_teacher,
)

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
    seg, depth = load_teacher(teachers["seg"]).net, load_teacher(teachers["depth"]).net
    assert seg(x).shape == (1, SyntheticScenes.num_classes, 32, 32)
    out = depth(x)
    assert out.shape[-2:] == (32, 32) and torch.isfinite(out).all() and (out > 0).all()
    teacher = load_teacher(teachers["seg"])
    assert isinstance(teacher, Teacher) and isinstance(teacher.record, TeacherRecord)
    record = teacher.record
    assert record.task == "seg" and record.steps == 3 and len(record.losses) == 3
    assert record.config["width"] == 0.0625 and record.config["num_bins"] == 8
    assert record.loss_first == record.losses[0] and record.parameters == sum(p.numel() for p in seg.parameters())
    assert not hasattr(seg, "train_record") and not hasattr(seg, "teacher_config")  # nothing attached to the module


def test_amalgamator_accepts_trained_teachers(teachers):
    nets = {task: load_teacher(path).net for task, path in teachers.items()}
    images = SyntheticScenes("unlabelled", size=4, resolution=(32, 32))
    loader = torch.utils.data.DataLoader([images[i] for i in range(4)], batch_size=2)
    am = Amalgamator(nets, progress=False, lr=0.01)
    am.fit(loader, 1, max_steps_per_block=1)
    points = am.branch_out()
    target = am.finetune(loader, 1, max_steps=1)
    out = target.eval()(images[0]["image"][None])
    assert set(out) == {"seg", "depth"} and set(points) == {"seg", "depth"}
    assert all(torch.isfinite(v).all() for v in out.values())


# ------------------------------------------------------------------------------ TeacherRecord
_TRAIN_KEYS = ["steps", "batch_size", "lr", "optimizer", "weight_decay", "power", "flip", "channels_last", "seed",
               "data", "seconds", "loss_first", "loss_final", "parameters"]


def test_train_teacher_returns_net_and_record_and_the_json_format_is_unchanged(tmp_path):
    data = SyntheticScenes("train", size=2, resolution=(32, 32))
    out = tmp_path / "t.safetensors"
    net, record = train_teacher("normal", data, steps=2, batch_size=2, width=0.0625, num_bins=8, device="cpu",
                                progress=False, out=out, data_name="tiny")
    assert isinstance(net, torch.nn.Module) and not net.training
    assert record.task == "normal" and record.steps == 2 and record.data == "tiny" and len(record.losses) == 2
    meta = json.loads(out.with_suffix(".json").read_text())
    # the sidecar layout that existing caches have (and that older pyamalgam versions read)
    assert list(meta) == ["format", "version", "config", "weights", "train", "losses"]
    assert meta["format"] == "pyamalgam-teacher" and meta["version"] == 1 and meta["weights"] == "t.safetensors"
    assert list(meta["config"]) == ["task", "width", "depth", "decoder", "num_classes", "num_bins", "max_depth",
                                    "in_chans"]
    assert list(meta["train"]) == _TRAIN_KEYS and meta["losses"] == record.losses
    assert load_teacher(out).record == record


def test_a_checkpoint_written_before_teacher_record_loads(tmp_path):
    """A sidecar as older versions wrote it (and the demo's cache key in it) loads into the record."""
    config = {"task": "depth", "width": 0.0625, "depth": 5, "decoder": "unpool", "num_classes": 7, "num_bins": 8,
              "max_depth": 8.0, "in_chans": 3}
    net = build_teacher(**config)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "pyamalgam-teacher"})
    train = {"steps": 5, "batch_size": 2, "lr": 0.001, "optimizer": "adam", "weight_decay": 4e-06, "power": 0.9,
             "flip": True, "seed": 0, "data": "synthetic", "seconds": 1.5, "loss_first": 2.0, "loss_final": 1.0,
             "parameters": 123}  # no channels_last: an older record
    (tmp_path / "old.json").write_text(json.dumps({
        "format": "pyamalgam-teacher", "version": 1, "config": config, "weights": "old.safetensors",
        "train": train, "losses": [2.0, 1.5, 1.2, 1.1, 1.0], "demo_key": "abc"}, indent=1))
    loaded, record = load_teacher(tmp_path / "old")
    assert record.config == config and record.steps == 5 and record.loss_final == 1.0 and record.channels_last is None
    assert record.losses == [2.0, 1.5, 1.2, 1.1, 1.0] and record.extra == {"demo_key": "abc"}
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # saving it again writes the same document (absent fields stay absent)
    save_teacher(loaded, tmp_path / "again", record)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == {**json.loads((tmp_path / "old.json").read_text()), "weights": "again.safetensors"}


def test_save_teacher_of_an_untrained_network_and_bad_records(tmp_path):
    config = {"task": "seg", "width": 0.0625, "num_classes": 7}
    save_teacher(build_teacher(**config), tmp_path / "raw", TeacherRecord(config=config))
    meta = json.loads((tmp_path / "raw.json").read_text())
    assert meta["train"] == {} and meta["losses"] == [] and meta["config"] == config
    net, record = load_teacher(tmp_path / "raw.safetensors")
    assert record.steps is None and record.task == "seg"
    with pytest.raises(TypeError, match="needs a TeacherRecord"):
        save_teacher(net, tmp_path / "x", config)
    with pytest.raises(ValueError, match="with 'task'"):
        TeacherRecord(config={"width": 1.0})
    with pytest.raises(ValueError, match="must not hold"):
        TeacherRecord(config=config, extra={"losses": []})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.steps = 3


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"steps": 2.5}, TypeError, "steps must be an int"),
    ({"batch_size": True}, TypeError, "batch_size must be an int, got bool"),
])
def test_train_teacher_checks_its_int_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        train_teacher("seg", SyntheticScenes("train", size=2, resolution=(32, 32)), device="cpu", progress=False,
                      **kwargs)

"""Exit codes 0/1/2/130 as documented (docs/demo.md, docs/robustness.md "Bad arguments and exit
codes"): a bad argument exits 2 with a message naming it before any work starts; data that cannot
be read exits 2 naming the file; a failed run exits 1. Every command runs in this process
(``main(argv)``), on files made here.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from pyamalgam.cli import main
from pyamalgam.demo import DemoConfig, demo_config
from pyamalgam.teachers import run_train_teacher

TINY_TEACHER = ["--steps", "2", "--resolution", "32x32", "--batch-size", "1", "--width", "0.0625", "--num-bins", "8",
                "--device", "cpu", "--no-progress"]
# A demo that would finish in seconds, so that a check which comes too late shows as files in --out.
TINY_DEMO = [f"--set={kv}" for kv in ("resolution=32x32", "width=0.0625", "num_bins=8", "train_size=2",
                                      "unlabelled_size=2", "test_size=2", "figure_samples=1", "teacher_steps=1",
                                      "block_steps=1", "finetune_steps=1", "probe_images=1", "batch_size=1",
                                      "eval_batch=2")]


def run(argv, capsys):
    """(exit code, stderr) of ``pyamalgam ARGV``."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error message; it must be one line (a DataLoader worker's traceback is not shown)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------- unreadable data: 2

def nyu_root(root, broken: dict) -> str:
    """NYUv2 train + val with one sample each; ``broken`` maps "image" etc. to the bytes of train's file."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        arrays = {"image": rng.random((4, 6, 3)), "label": rng.integers(0, 13, (4, 6)),
                  "depth": np.ones((4, 6, 1), np.float32), "normal": np.dstack([np.zeros((4, 6, 2)), np.ones((4, 6))])}
        for folder, value in arrays.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / split / folder / "0.npy", value)
    for folder, content in broken.items():
        (root / "train" / folder / "0.npy").write_bytes(content)
    return f"nyuv2:{root}"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_zero_byte_nyuv2_file_exits_2_naming_it(tmp_path, capsys, workers):
    data = nyu_root(tmp_path / "nyu", {"depth": b""})
    out = tmp_path / "t" / "seg"
    rc, err = run(["train-teacher", "--task", "seg", "--data", data, "--out", str(out), "--workers", workers,
                   *TINY_TEACHER], capsys)
    assert rc == 2, err
    assert "train/depth/0.npy" in one_error_line(err)
    assert not out.with_suffix(".json").exists()


def test_non_canonical_nyuv2_name_exits_2_naming_it(tmp_path, capsys):
    data = nyu_root(tmp_path / "nyu", {})
    nyu = tmp_path / "nyu" / "train"
    for folder in ("image", "label", "depth", "normal"):
        (nyu / folder / "0.npy").rename(nyu / folder / "00.npy")
    rc, err = run(["train-teacher", "--task", "seg", "--data", data, "--out", str(tmp_path / "t"), *TINY_TEACHER],
                  capsys)
    assert rc == 2 and "00.npy" in one_error_line(err)


def test_demo_on_unreadable_nyuv2_exits_2(tmp_path, capsys):
    data = nyu_root(tmp_path / "nyu", {"image": b"\x93NUMPY garbage"})
    rc, err = run(["demo", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
                   *TINY_DEMO], capsys)
    assert rc == 2 and "train/image/0.npy" in one_error_line(err)


@pytest.mark.parametrize("content", [b"", b"not a png"], ids=["empty", "garbage"])
def test_corrupt_cityscapes_png_exits_2_naming_it(tmp_path, capsys, content):
    from PIL import Image

    stem, root = "ulm_000000_000019", tmp_path / "city"
    files = {"leftImg8bit": "_leftImg8bit.png", "gtFine": "_gtFine_labelIds.png", "disparity": "_disparity.png"}
    for kind, suffix in files.items():
        (root / kind / "train" / "ulm").mkdir(parents=True)
        Image.fromarray(np.full((4, 6), 9, np.uint16 if kind == "disparity" else np.uint8)).save(
            root / kind / "train" / "ulm" / f"{stem}{suffix}")
    (root / "camera" / "train" / "ulm").mkdir(parents=True)
    (root / "camera" / "train" / "ulm" / f"{stem}_camera.json").write_text(
        json.dumps({"extrinsic": {"baseline": 0.2}, "intrinsic": {"fx": 2000.0}}))
    (root / "leftImg8bit" / "train" / "ulm" / f"{stem}_leftImg8bit.png").write_bytes(content)
    rc, err = run(["train-teacher", "--task", "seg", "--data", f"cityscapes:{root}", "--out", str(tmp_path / "t"),
                   *TINY_TEACHER], capsys)
    assert rc == 2 and f"{stem}_leftImg8bit.png" in one_error_line(err)


# ------------------------------------------------------------------ unwritable --out: 2

@pytest.fixture
def unwritable(tmp_path):
    """A folder path that cannot be created: under a read-only folder, or (root ignores file
    modes) under /sys, where even root may not create anything."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked / "run"
        locked.chmod(0o700)
        return
    path = "/sys/pyamalgam-test-unwritable"
    try:
        os.mkdir(path)
    except PermissionError:
        yield type(tmp_path)(path) / "run"
        return
    os.rmdir(path)
    pytest.skip("no folder here refuses root")


def test_unwritable_demo_out_exits_2_before_work(unwritable, capsys):
    rc, err = run(["demo", "--out", str(unwritable), "--device", "cpu", "--no-progress", *TINY_DEMO], capsys)
    assert rc == 2 and "usage:" in err
    line = one_error_line(err)
    assert "--out" in line and str(unwritable) in line


def test_unwritable_teacher_out_exits_2_before_work(unwritable, capsys):
    rc, err = run(["train-teacher", "--task", "seg", "--out", str(unwritable / "seg"), *TINY_TEACHER], capsys)
    assert rc == 2 and "usage:" in err
    assert "--out" in one_error_line(err) and str(unwritable) in err


def test_teacher_out_that_is_a_folder_exits_2(tmp_path, capsys):
    (tmp_path / "seg.safetensors").mkdir()
    rc, err = run(["train-teacher", "--task", "seg", "--out", str(tmp_path / "seg"), *TINY_TEACHER], capsys)
    assert rc == 2 and "is a folder" in one_error_line(err)


# ------------------------------------------------------------------------ --device: 2

@pytest.mark.parametrize("device", ["bogus", "tpu", "cuda:x", "meta"])
def test_selfcheck_bad_device_exits_2(capsys, device):
    rc, err = run(["selfcheck", "--device", device], capsys)
    assert rc == 2 and "argument --device: expected cpu, cuda or cuda:N" in one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["selfcheck"], ["demo"], ["train-teacher", "--task", "seg"]])
def test_cuda_without_a_gpu_exits_2(capsys, command):
    rc, err = run([*command, "--device", "cuda"], capsys)
    assert rc == 2 and "CUDA is not available" in one_error_line(err)


def test_cuda_device_index_and_cpu_only_build_exit_2(capsys, monkeypatch):
    import pyamalgam._extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(pyamalgam._extension, "has_cuda_kernels", lambda: False)
    rc, err = run(["selfcheck", "--device", "cuda:3"], capsys)
    assert rc == 2 and "has 1 CUDA device(s)" in one_error_line(err)
    rc, err = run(["selfcheck", "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA kernels" in one_error_line(err)


# ------------------------------------------------------------------------ --set: 2

@pytest.mark.parametrize("setting, needle", [
    ("width=nan", "width must be a finite number"),
    ("width=inf", "width must be a finite number"),
    ("width=0", "width must be a finite number"),
    ("width=5", "width must be a finite number in (0, 4]"),
    ("depth=6", "depth must be an int in [1, 5]"),
    ("depth=0", "depth must be an int in [1, 5]"),
    ("teacher_lr=inf", "teacher_lr must be a finite number > 0"),
    ("teacher_lr=nan", "teacher_lr must be a finite number > 0"),
    ("amalgam_lr=-1", "amalgam_lr must be a finite number > 0"),
    ("num_bins=1", "num_bins must be an int >= 2"),
    ("batch_size=0", "batch_size must be an int >= 1"),
    ("num_workers=-1", "num_workers must be an int >= 0"),
    ("target_cache_mb=0", "target_cache_mb must be an int >= 1"),
    ("figure_samples=0", "figure_samples must be an int >= 1"),
    ("teacher_steps=1.5", "teacher_steps needs an int"),
    ("amalgam_optimizer=lbfgs", "amalgam_optimizer must be one of"),
    ("resolution=0x64", "HxW"),
    ("data=imagenet", "data must be 'synthetic'"),
    ("channels_last=maybe", "channels_last needs true or false"),
    ("figure_samples=9", "test_size (2) < figure_samples (9)"),
    ("depth=4", "resolution 40x40 must be two multiples of 2^depth = 16"),  # with resolution=40x40 below
])
def test_bad_set_exits_2_before_anything_is_written(tmp_path, capsys, setting, needle):
    extra = ["--set", "resolution=40x40"] if setting == "depth=4" else []
    out = tmp_path / "run"
    rc, err = run(["demo", "--out", str(out), "--device", "cpu", "--no-progress", *TINY_DEMO, *extra,
                   "--set", setting], capsys)
    assert rc == 2 and "usage:" in err
    assert needle in one_error_line(err)
    assert not out.exists()  # checked before the run folder was even created


@pytest.mark.parametrize("argv, needle", [
    (["train-teacher", "--task", "seg", "--depth", "6"], "argument --depth"),
    (["train-teacher", "--task", "seg", "--width", "nan"], "argument --width"),
    (["train-teacher", "--task", "seg", "--width", "inf"], "argument --width"),
    (["train-teacher", "--task", "seg", "--lr", "nan"], "argument --lr"),
    (["train-teacher", "--task", "seg", "--num-bins", "1"], "argument --num-bins"),
    (["train-teacher", "--task", "seg", "--seed", str(2**64)], "argument --seed"),
    (["train-teacher", "--task", "seg", "--depth", "5", "--resolution", "40x40"], "--resolution 40x40"),
    (["demo", "--threads", "100000"], "argument --threads"),
    (["demo", "--seed", str(2**63)], "argument --seed"),
])
def test_bad_arguments_name_the_argument(tmp_path, capsys, argv, needle):
    rc, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "usage:" in err and needle in one_error_line(err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the Python API

BAD_FIELDS = {  # one bad value per DemoConfig field
    "resolution": (48, 0), "width": float("nan"), "depth": 6, "num_bins": 1, "train_size": 0, "unlabelled_size": -1,
    "test_size": 1.5, "batch_size": True, "teacher_steps": "10", "teacher_lr": float("inf"), "block_steps": 0,
    "finetune_steps": None, "finetune_variants": 1, "amalgam_lr": 0.0, "amalgam_optimizer": "lbfgs",
    "probe_images": 0, "target_cache_mb": 0, "eval_batch": 0, "figure_samples": 0, "num_workers": -1,
    "channels_last": "yes", "data": "nyuv2", "structured_rows": "pi+bogus", "task_weights": "depth=-1",
}


def test_every_demo_config_field_has_a_bad_value_here():
    assert set(BAD_FIELDS) == {f.name for f in dataclasses.fields(DemoConfig)}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_demo_config_checks_each_field(field):
    with pytest.raises((TypeError, ValueError), match=field):
        DemoConfig(**{field: BAD_FIELDS[field]})
    with pytest.raises((TypeError, ValueError), match=field):
        dataclasses.replace(demo_config(True, "cpu"), **{field: BAD_FIELDS[field]})


def test_demo_config_normalises():
    cfg = DemoConfig(resolution=[64, 64], width=1, teacher_steps=np.int64(5))
    assert cfg.resolution == (64, 64) and type(cfg.width) is float and type(cfg.teacher_steps) is int


@pytest.mark.parametrize("kwargs, needle", [
    ({"depth": 6}, "depth"), ({"width": float("nan")}, "width"), ({"lr": float("inf")}, "lr"),
    ({"seed": -1}, "seed"), ({"num_bins": 1}, "num_bins"), ({"optimizer": "lbfgs"}, "optimizer"),
])
def test_run_train_teacher_checks_arguments_before_opening_data(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):  # not the FileNotFoundError of the missing data
        run_train_teacher("seg", tmp_path / "seg", data=f"nyuv2:{tmp_path / 'missing'}", **kwargs)


# ------------------------------------------------------------------- a failed run: 1

def test_diverging_run_exits_1(tmp_path, capsys):
    rc, err = run(["train-teacher", "--task", "depth", "--size", "2", "--out", str(tmp_path / "d"), *TINY_TEACHER,
                   "--steps", "5", "--lr", "1e30"], capsys)
    assert rc == 1, err
    assert "failed:" in err and "depth" in err and "Traceback" not in err

"""Bad arguments: exit code 2 and a message naming the problem, before any work starts."""
import subprocess
import sys

import pytest
import torch

from pyamalgam.cli import main
from pyamalgam.demo import demo_config


def _fails(argv, capsys, *needles, code=2):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--seed", "-1"], "non-negative integer"),
    (["demo", "--seed", "x"], "non-negative integer"),
    (["demo", "--device", "tpu"], "cpu, cuda or cuda:N"),
    (["demo", "--threads", "0"], "positive integer"),
    (["demo", "--data", "imagenet"], "synthetic, nyuv2:ROOT or cityscapes:ROOT"),
    (["demo", "--data", "nyuv2"], "needs its folder"),
    (["demo", "--data", "cityscapes:/no/such/folder"], "no folder"),
    (["demo", "--set", "nosuch=1"], "KEY=VALUE"),
    (["demo", "--set", "teacher_steps=many"], "teacher_steps needs an int"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["train-teacher"], "--task"),
    (["train-teacher", "--task", "albedo"], "invalid choice"),
    (["train-teacher", "--task", "seg", "--steps", "0"], "positive integer"),
    (["train-teacher", "--task", "seg", "--lr", "-1"], "positive number"),
    (["train-teacher", "--task", "seg", "--resolution", "tall"], "HxW"),
    (["train-teacher", "--task", "seg", "--resolution", "48x64"], "multiples of 2^depth = 32"),
    (["train-teacher", "--task", "seg", "--optimizer", "lbfgs"], "invalid choice"),
    (["train-teacher", "--task", "seg", "--depth", "6"], "argument --depth"),
    (["train-teacher", "--task", "seg", "--width", "nan"], "argument --width"),
    (["train-teacher", "--task", "seg", "--num-bins", "1"], "argument --num-bins"),
    (["demo", "--set", "width=nan"], "width must be a finite number"),
    (["demo", "--set", "depth=6"], "depth must be an int in [1, 5]"),
    (["demo", "--set", "teacher_lr=inf"], "teacher_lr must be a finite number > 0"),
    (["selfcheck", "--device", "bogus"], "cpu, cuda or cuda:N"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    _fails(argv, capsys, needle)


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(["demo", "--out", str(f)], capsys, "not a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    _fails(["demo", "--device", "cuda"], capsys, "CUDA is not available")


def test_config_checked_before_work(tmp_path, capsys):
    _fails(["demo", "--quick", "--out", str(tmp_path), "--set", "resolution=48x48"], capsys,
           "multiples of 2^depth = 32")
    assert not (tmp_path / "data").exists()


def test_real_data_folder_with_wrong_layout(tmp_path, capsys):
    _fails(["train-teacher", "--task", "seg", "--data", f"nyuv2:{tmp_path}", "--out", str(tmp_path / "t"),
            "--no-progress"], capsys, "pyamalgam train-teacher: error:", "not found")


def test_exit_code_of_the_console_entry_point(pyamalgam_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyamalgam.cli", "train-teacher", "--task", "seg", "--steps", "-3"],
                          env=pyamalgam_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_presets_scale_with_the_device():
    cpu_quick, cpu_full = demo_config(True, "cpu"), demo_config(False, "cpu")
    gpu_quick, gpu_full = demo_config(True, "cuda"), demo_config(False, "cuda")
    area = lambda c: c.resolution[0] * c.resolution[1]  # noqa: E731
    assert area(cpu_quick) < area(cpu_full) < area(gpu_full) and area(cpu_quick) < area(gpu_quick)
    assert cpu_quick.teacher_steps < cpu_full.teacher_steps < gpu_full.teacher_steps
    assert demo_config(True, "cpu", teacher_steps=7).teacher_steps == 7
    with pytest.raises(ValueError, match="unknown field"):
        demo_config(True, "cpu", steps=7)

"""The run logs describe what happened once, and one folder serves one run at a time.

Before: a resumed run appended a second ``branch_out`` record to ``amalgamation.jsonl`` (and a
block that a killed run had logged but not checkpointed was logged twice), every rerun of the
demo appended its branch-outs again, and two concurrent runs on one ``--out`` (or one
``checkpoint_dir``) wrote into the same files, duplicating every record.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader, tiny_run, tiny_teachers
from pyamalgam.amalgamation import checkpoints
from pyamalgam.engine import FolderInUseError, FolderLock

TINY_DEMO = ["--device", "cpu", "--threads", "1", "--no-progress"] + [
    a for kv in ("resolution=32x32", "width=0.0625", "depth=3", "num_bins=8", "train_size=4", "unlabelled_size=8",
                 "test_size=2", "batch_size=4", "teacher_steps=1", "block_steps=1", "finetune_steps=1",
                 "probe_images=4", "eval_batch=4", "figure_samples=1") for a in ("--set", kv)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _log(folder) -> list:
    return [json.loads(line) for line in (folder / "amalgamation.jsonl").read_text().splitlines()]


def test_a_finished_run_resumed_again_logs_nothing_twice(tmp_path):
    am = tiny_run(tmp_path, loader=tiny_loader(n=4))
    first = _log(tmp_path)
    assert [r["event"] for r in first] == ["block"] * 6 + ["branch_out", "finetune"]
    again = tiny_run(tmp_path, loader=tiny_loader(n=4))  # fit, branch_out and finetune, all resumed
    assert _log(tmp_path) == first == again.history  # before: a second branch_out record
    assert again.branch_points == am.branch_points


def test_a_record_written_after_the_last_checkpoint_is_not_duplicated_by_the_resume(tmp_path, monkeypatch):
    """Killed between logging block 3 and checkpointing it: the resumed run redoes block 3's last
    step and logs block 3 again; the log keeps one block-3 record, the resumed run's."""
    real = checkpoints.save_run

    class Killed(Exception):
        pass

    def save_run(am, phase, n, state=None):
        if phase == "blocks" and n == 3 and state is None:
            raise Killed  # block 3 is logged; its end-of-block checkpoint never comes
        real(am, phase, n, state)

    monkeypatch.setattr("pyamalgam.amalgamation.amalgamator.save_run", save_run)
    with pytest.raises(Killed):
        tiny_run(tmp_path, checkpoint_every=1)
    assert [r.get("block") for r in _log(tmp_path)] == [1, 2, 3]
    monkeypatch.undo()
    am = tiny_run(tmp_path, checkpoint_every=1)
    log = _log(tmp_path)
    assert [r.get("block") for r in log if r["event"] == "block"] == [1, 2, 3, 4, 5, 6]
    assert [r["event"] for r in log] == ["block"] * 6 + ["branch_out", "finetune"] and log == am.history


def test_a_fresh_run_starts_its_log_afresh(tmp_path):
    (tmp_path / "amalgamation.jsonl").write_text('{"event": "block", "block": 1, "from": "an old run"}\n')
    am = Amalgamator(tiny_teachers(), log_dir=tmp_path, progress=False)
    am.fit(tiny_loader(n=4), 1, max_steps_per_block=1)
    assert [r["block"] for r in _log(tmp_path)] == [1, 2, 3, 4, 5, 6] and "from" not in _log(tmp_path)[0]


HOLDER = """
import sys, time
from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_teachers
am = Amalgamator(tiny_teachers(), checkpoint_dir=sys.argv[1], progress=False)
print("ready", flush=True)
time.sleep(120)
"""


def _hold(cmd, env, lock_file):
    """Start ``cmd`` and wait until it holds ``lock_file`` (its pid is written once the lock is taken)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=lock_file.parent.parent)
    deadline = time.monotonic() + 120
    while not (lock_file.exists() and lock_file.read_text() == f"{proc.pid}\n"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the holder did not take its lock in 120 s"
        time.sleep(0.05)
    return proc


def test_a_second_process_on_one_checkpoint_dir_is_refused_until_the_first_dies(tmp_path, pyamalgam_env):
    folder = tmp_path / "ka"
    proc = _hold([sys.executable, "-c", HOLDER, str(folder)], pyamalgam_env, folder / ".lock")
    try:
        with pytest.raises(FolderInUseError) as err:
            Amalgamator(tiny_teachers(), checkpoint_dir=folder, progress=False)
        assert f"checkpoint_dir {folder} is in use by another run (pid {proc.pid}, which holds {folder}/.lock)" in str(err.value)
        os.kill(proc.pid, signal.SIGKILL)  # a killed run leaves its lock file behind ...
        proc.wait()
        assert (folder / ".lock").exists()
        am = Amalgamator(tiny_teachers(), checkpoint_dir=folder, progress=False)  # ... which is not a lock
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n" and am.checkpoint_dir == folder
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_is_shared_inside_one_process_and_its_file_goes_with_the_last_holder(tmp_path):
    a, b = FolderLock(tmp_path).acquire(), FolderLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    a.release()
    assert (tmp_path / ".lock").exists()
    b.release()
    assert not (tmp_path / ".lock").exists()


def test_two_demos_on_one_out_the_second_is_refused_with_exit_2(tmp_path, pyamalgam_env, capsys):
    from pyamalgam.cli import main

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyamalgam.cli", "demo", "--out", str(out), *TINY_DEMO]
    proc = _hold(cmd, {**pyamalgam_env, "OMP_NUM_THREADS": "1"}, out / ".lock")
    try:
        assert main(["demo", "--out", str(out), *TINY_DEMO]) == 2
        err = capsys.readouterr().err
        assert f"error: out (--out) {out} is in use by another run (pid {proc.pid}" in err
    finally:
        proc.kill()
        proc.wait()


def test_a_demo_rerun_leaves_every_log_as_the_first_run_wrote_it(tmp_path):
    from pyamalgam.cli import main

    assert main(["demo", "--out", str(tmp_path), *TINY_DEMO]) == 0
    stages = sorted((tmp_path / "stages").iterdir())
    first = {s.name: (s / "amalgamation.jsonl").read_text() for s in stages}
    assert [r["event"] for r in _log(tmp_path / "stages" / "tn2")][6:8] == ["branch_out", "finetune"]
    assert main(["demo", "--out", str(tmp_path), *TINY_DEMO]) == 0  # every stage cached
    assert {s.name: (s / "amalgamation.jsonl").read_text() for s in stages} == first  # before: + 6 branch-outs
    assert not list(tmp_path.rglob(".lock"))  # the locks went with the run

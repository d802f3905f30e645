"""Checkpoints and resume: an interrupted run, even by ``kill -9``, ends as an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam._testing import (
    FailingAt,
    Interrupt,
    _Images,
    kill_9_when,
    state_digest,
    tiny_loader,
    tiny_run,
)
from pyamalgam.amalgamation import load_checkpoint, save_checkpoint

# 12 images in batches of 4: 3 steps per block, 6 blocks, then 3 fine-tuning steps.
STEPS = 6 * 3 + 3
KILLABLE = """
import sys
from pyamalgam._testing import tiny_loader, tiny_run
tiny_run(sys.argv[1], loader=tiny_loader(delay=0.04), checkpoint_every=1)
"""


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run (same seed, CPU, one thread)."""
    return tiny_run(None)


def same_run(am, reference):
    assert state_digest(am.student) == state_digest(reference.student)
    assert state_digest(am.codings) == state_digest(reference.codings)
    assert state_digest(am.target_net) == state_digest(reference.target_net)
    assert am.loss_table == reference.loss_table and am.branch_points == reference.branch_points


def _FailingImages(at):
    """tiny_loader's images, raising when item number ``at`` (counted over the whole run) is fetched."""
    return FailingAt(_Images(12, 4, 0.0), at)


# fit() first reads the 12 probe images of Eq. 7's final losses (by index); then 12 items a block.
# item 42: block 3, mid-epoch; 61: block 5's first step (resume from a block-end checkpoint);
# 94: fine-tuning step 3 (resume from a fine-tuning checkpoint).
@pytest.mark.parametrize("at", [42, 61, 94])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, reference, at):
    interrupted = DataLoader(_FailingImages(at), batch_size=4, shuffle=True)
    with pytest.raises(Interrupt):
        tiny_run(tmp_path, loader=interrupted, checkpoint_every=1)
    same_run(tiny_run(tmp_path, checkpoint_every=1), reference)


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, reference, pyamalgam_env):
    checkpoint = tmp_path / "last.safetensors"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tmp_path)], env=pyamalgam_env, stderr=err,
                                cwd=tmp_path)  # not the checkout: `-c` imports from the cwd first
    kill_9_when(proc, lambda: _inside_block(checkpoint, at_least=3),  # killed with blocks done and one half-done
                tmp_path / "stderr.txt", "no checkpoint in block 3", poll=0.02)
    assert proc.returncode == -signal.SIGKILL
    _, meta = load_checkpoint(checkpoint)  # the last good checkpoint is whole
    assert meta["phase"] == "blocks" and meta["completed_blocks"][:2] == [1, 2]
    done = [json.loads(line)["block"] for line in (tmp_path / "amalgamation.jsonl").read_text().splitlines()]
    am = tiny_run(tmp_path, checkpoint_every=1)
    same_run(am, reference)
    log = [json.loads(line) for line in (tmp_path / "amalgamation.jsonl").read_text().splitlines()]
    blocks = [r["block"] for r in log if r["event"] == "block"]
    assert blocks == list(range(1, 7)) and blocks[: len(done)] == done  # finished blocks were not redone


def _inside_block(path, at_least):
    if not path.is_file():
        return False
    _, meta = load_checkpoint(path)  # safe while the writer runs: os.replace swaps whole files
    return meta["phase"] == "blocks" and meta["step"] is not None and meta["block"] >= at_least


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 1})

    def crash(fd):
        raise KeyboardInterrupt  # e.g. the process dies between writing and renaming

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temp file left


WRITER = """
import sys, torch
from pyamalgam.amalgamation import save_checkpoint
for i in range(1, 600):  # three sizes, so that a header and data of different versions cannot fit
    save_checkpoint(sys.argv[1], {"w": torch.full((10 + 5000 * (i % 3),), float(i))}, {"step": i})
"""


def test_a_reader_beside_a_writer_sees_whole_checkpoints(tmp_path, pyamalgam_env):
    """What `_inside_block` above does while training runs (and what found the bug): reading the
    header and the data through two opens could pair versions and fail."""
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.zeros(10)}, {"step": 0})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=pyamalgam_env, cwd=tmp_path)
    loads = 0
    try:
        while writer.poll() is None:
            tensors, meta = load_checkpoint(path)
            assert torch.equal(tensors["w"], torch.full_like(tensors["w"], meta["step"]))  # one version
            loads += 1
    finally:
        writer.kill()
        writer.wait()
    assert loads > 100


def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="last.safetensors is not a safetensors file"):
        load_checkpoint(path)


def test_a_checkpoint_inside_a_block_holds_weights_optimizer_scheduler_and_rng(tmp_path):
    with pytest.raises(Interrupt):  # item 42 is in step 2 of block 3: the last checkpoint is step 1
        tiny_run(tmp_path, loader=DataLoader(_FailingImages(42), batch_size=4, shuffle=True), checkpoint_every=1)
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert (meta["phase"], meta["block"], meta["step"], meta["total"]) == ("blocks", 3, 1, 3)
    assert meta["completed_blocks"] == [1, 2] and set(meta["loss_table"]["seg"]) == {"1", "2"}
    assert {"optimizer", "scheduler", "rng", "epoch_rng", "sums"} <= set(meta)
    assert any(k.startswith("student/blocks.3.") for k in tensors) and any(k.startswith("codings/3.") for k in tensors)
    assert any(k.startswith("optimizer/") for k in tensors)  # the momentum buffers


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path):
    tiny_run(tmp_path, loader=tiny_loader(n=4))
    with pytest.raises(ValueError, match="was written by a different setup"):
        tiny_run(tmp_path, loader=tiny_loader(n=4), objective="feature")

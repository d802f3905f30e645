"""The guarantees every trainer inherits from the engine, checked with a toy trainer of its own
(no Amalgamator): a run killed with ``kill -9`` inside an epoch resumes bit-identically, a crash
in the middle of a checkpoint write keeps the previous checkpoint, and two gloo ranks under
torchrun stay in sync (weights and BatchNorm buffers) with one writer of the run log."""
import json
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from pyamalgam._testing import checkpoint_step, kill_9_when

# 48 samples in batches of 4, 2 epochs: 24 steps, a checkpoint after each one. The network has
# BatchNorm (buffers DDP must sync) and dropout (the global RNG matters); the loader shuffles
# with its own generator (its state must be part of the checkpoint).
TOY = """
import json, os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
import pyamalgam._io
from pyamalgam._testing import state_digest
from pyamalgam.engine import Engine, PhaseState, load_checkpoint, save_checkpoint

out, delay, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
if mode == "ddp":
    import torch.distributed as dist
    dist.init_process_group("gloo")
    out = os.path.join(out, f"rank{dist.get_rank()}")
if mode.startswith("die-in-write-"):  # SIGKILL inside the n-th checkpoint write, before its rename
    calls, die_at, fsync = [0], int(mode.rsplit("-", 1)[1]), os.fsync
    def dying_fsync(fd):
        calls[0] += 1
        if calls[0] == 2 * die_at - 1:  # each write fsyncs the file, then its folder
            os.kill(os.getpid(), 9)
        fsync(fd)
    pyamalgam._io.os.fsync = dying_fsync
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(48, 2, 4, 4, generator=g), torch.randn(48, 1, generator=g))
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
if mode == "ddp":
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=True, seed=0))
else:
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
engine = Engine(device="cpu", optimizer="sgd", lr=0.05, progress=False, checkpoint_every=1, log_dir=out)
ckpt = os.path.join(out, "last.safetensors")
state = None
if os.path.exists(ckpt):
    tensors, meta = load_checkpoint(ckpt)
    state = PhaseState.from_meta(meta, tensors)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
    engine.restore_rng(state.rng, loader)

def step_loss(module, batch):
    time.sleep(delay)
    x, y = batch
    loss = (module(x) - y).square().mean()
    return loss, {"mse": loss}

def save(st):
    if engine.rank == 0:  # the trainer's choice, as the Amalgamator's: one writer
        tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
        save_checkpoint(ckpt, tensors, st.to_meta(tensors))

result = engine.run_phase(net, step_loss, loader, engine.plan(loader, 2, None), save=save, resume=state)
engine.log.write({"event": "done", "losses": result.losses})
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"result{engine.rank}.json"), "w") as f:
    json.dump({"digest": state_digest(net), "losses": result.losses, "world_size": engine.world_size}, f)
"""
STEPS = 24


@pytest.fixture
def toy(tmp_path, pyamalgam_env):
    script = tmp_path / "toy.py"
    script.write_text(TOY)

    def run(out, mode="plain", delay=0.0, check=True, **popen):
        cmd = [sys.executable, str(script), str(out), str(delay), mode]
        env = {**pyamalgam_env, "OMP_NUM_THREADS": "1"}
        if popen:
            return subprocess.Popen(cmd, env=env, cwd=tmp_path, **popen)
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


def _result(out, rank=0):
    return json.loads((out / f"result{rank}.json").read_text())


def test_kill_9_inside_an_epoch_then_resume_is_bit_identical(tmp_path, toy):
    toy(tmp_path / "reference")
    out = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = toy(out, delay=0.05, stderr=err)
    kill_9_when(proc, lambda: (checkpoint_step(out / "last.safetensors") or 0) >= 15,  # epoch 2 (steps 13-24), half done
                tmp_path / "stderr.txt", "no checkpoint after step 15")
    killed_at = checkpoint_step(out / "last.safetensors")
    assert 15 <= killed_at < STEPS and not (out / "result0.json").exists()
    toy(out)
    assert _result(out) == _result(tmp_path / "reference")


@pytest.mark.parametrize("write", [1, 7])
def test_a_crash_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, toy, write):
    toy(tmp_path / "reference")
    out = tmp_path / "crashed"
    proc = toy(out, mode=f"die-in-write-{write}", check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(out / "last.safetensors") == (None if write == 1 else write - 1)  # never torn
    toy(out)  # resumes from the previous checkpoint (or starts afresh), the temporary file ignored
    assert _result(out) == _result(tmp_path / "reference")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_gloo_ranks_stay_in_sync_and_one_writes_the_log(tmp_path, toy, pyamalgam_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "toy.py"), str(tmp_path), "0", "ddp"]
    proc = subprocess.run(cmd, env={**pyamalgam_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = _result(tmp_path / "rank0", 0), _result(tmp_path / "rank1", 1)
    assert r0["world_size"] == 2 and r0 == r1  # same weights, BatchNorm buffers, logged (averaged) losses
    assert (tmp_path / "rank0" / "train.jsonl").is_file() and not (tmp_path / "rank1" / "train.jsonl").exists()

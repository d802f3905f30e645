"""DistributedDataParallel: two CPU processes under torchrun (gloo) stay in sync; rank 0 alone writes."""
import json
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)

# Each rank gets its own checkpoint_dir so that a write by rank 1 would show; a real run gives
# every rank the same (shared) directory.
SCRIPT = """
import json, os, sys
import torch.distributed as dist
from pyamalgam._testing import state_digest, tiny_loader, tiny_run

dist.init_process_group("gloo")  # before the DistributedSampler, which asks for the world size
out, rank = sys.argv[1], dist.get_rank()
am = tiny_run(os.path.join(out, f"rank{rank}"), loader=tiny_loader(n=16, distributed=True), checkpoint_every=1,
              resume=False)
result = {"world_size": am.world_size, "loss_table": am.loss_table, "points": am.branch_points,
          **{k: state_digest(getattr(am, k)) for k in ("student", "codings", "target_net")}}
with open(os.path.join(out, f"result{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_two_cpu_ranks_stay_in_sync_and_only_rank_0_writes(tmp_path, pyamalgam_env):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    env = {**pyamalgam_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0 == r1  # same weights (BatchNorm statistics included), loss tables and branch points
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["amalgamation.jsonl", "last.safetensors"]
    assert not (tmp_path / "rank1").exists()

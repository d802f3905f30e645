"""The VideoDistiller under torchrun, two gloo ranks (docs/engine.md, "What a phase does"): the
student and every term's module (connectors, MF's ConvLSTM) end identical on both ranks, the
logged losses are each rank's last-epoch means averaged over the ranks, the phase plans the
steps of the DistributedSampler's share, and only rank 0 writes."""
from pathlib import Path

import pytest

from pyamalgam._testing import (
    RANK_PREAMBLE,
    assert_logged_mean_over_ranks,
    gloo_available,
    run_torchrun,
)

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is unavailable")

HERE = Path(__file__).parent
# Each rank gets its own checkpoint_dir so that a write by rank 1 would show.
SCRIPT = RANK_PREAMBLE + """
from _distill_cases import clip_loader, digest_all, video_distiller
from pyamalgam._testing import record_step_terms
from pyamalgam.engine import load_checkpoint
d = video_distiller(os.path.join(out, f"rank{rank}"), checkpoint_every=2)
local = record_step_terms(d)
d.fit(clip_loader(n=8, distributed=True), 2)
meta = load_checkpoint(os.path.join(out, "rank0", "last.safetensors"))[1] if rank == 0 else {}
rank_result(out, {"world_size": d.world_size, **digest_all(d), "log": d.history[-1], "local": local,
                  "checkpoint": [meta.get("phase"), meta.get("steps")]})
"""


@pytest.mark.slow
def test_two_gloo_ranks_train_one_video_student_and_only_rank_0_writes(tmp_path, pyamalgam_env):
    r0, r1 = run_torchrun(SCRIPT, tmp_path, HERE, env=pyamalgam_env)
    assert r0["world_size"] == r1["world_size"] == 2
    assert (r0["student"], r0["terms"], r0["log"]["losses"]) == (r1["student"], r1["terms"], r1["log"]["losses"])
    # 8 clips, 4 per rank, 2 a batch: 2 steps an epoch, 4 in 2 epochs (not 8: each rank reads its share)
    assert r0["log"]["steps"] == 4 and len(r0["local"]) == len(r1["local"]) == 4
    assert set(r0["log"]["losses"]) == {"pi", "pa", "pf", "mf", "tl", "mc", "labelled", "total"}
    assert_logged_mean_over_ranks(r0["log"]["losses"], [r0["local"], r1["local"]], window=2)
    assert r0["checkpoint"] == ["done", 4]
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["distill.jsonl", "last.safetensors"]
    assert not (tmp_path / "rank1").exists()

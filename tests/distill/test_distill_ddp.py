"""Two gloo ranks under torchrun: the Distiller's student, connector and critic end identical on
both ranks, the logged (averaged) losses agree, and only rank 0 writes."""
from pathlib import Path

import pytest

from pyamalgam._testing import RANK_PREAMBLE, gloo_available, run_torchrun

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is unavailable")

HERE = Path(__file__).parent
# Each rank gets its own checkpoint_dir so that a write by rank 1 would show.
SCRIPT = RANK_PREAMBLE + """
from _distill_cases import digest_all, distiller, loader
d = distiller(os.path.join(out, f"rank{rank}"), checkpoint_every=2)
d.fit(loader(n=16, distributed=True), 2)
rank_result(out, {"world_size": d.world_size, **digest_all(d), "losses": d.history[-1]["losses"]})
"""


@pytest.mark.slow
def test_two_gloo_ranks_end_identical_and_only_rank_0_writes(tmp_path, pyamalgam_env):
    r0, r1 = run_torchrun(SCRIPT, tmp_path, HERE, env=pyamalgam_env)
    assert r0["world_size"] == 2 and r0 == r1  # weights, BatchNorm buffers, connector, critic, averaged losses
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["distill.jsonl", "last.safetensors"]
    assert not (tmp_path / "rank1").exists()

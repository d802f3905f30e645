"""The MultiTaskTrainer under torchrun, two gloo ranks (docs/engine.md, "What a phase does"): the
network, S paths, adaptors and weighting state end identical on both ranks, DWA weights every
step alike on both (from the mean over the ranks of each step's losses),
the logged losses are each rank's last-epoch means averaged over the ranks, and only rank 0
writes."""
from pathlib import Path

import pytest
import torch

from pyamalgam._testing import (
    RANK_PREAMBLE,
    assert_logged_mean_over_ranks,
    gloo_available,
    run_torchrun,
)

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is unavailable")

HERE = Path(__file__).parent
TASKS = ("seg", "depth", "normal")  # _mtl_cases.TASKS, in the network's order
# SD-MTCNN (star-star, full), DWA over 1-step periods (it reweights from step 3 on) and a KD
# teacher: every part of the step module trains. Each rank gets its own checkpoint_dir.
SCRIPT = RANK_PREAMBLE + """
from _mtl_cases import digest, loader, tiny_mtl
from pyamalgam._testing import record_step_terms, tiny_net
from pyamalgam.multitask import MultiTaskTrainer, SelfDistillation
teacher = tiny_net("segmentation", 5, depth=2, num_classes=4, num_bins=8, name="seg")
tr = MultiTaskTrainer(tiny_mtl(shallow=True), sd=SelfDistillation("encoder", "star2", full=True), weighting="dwa",
                      dwa_period=1, teachers={"seg": teacher}, checkpoint_dir=os.path.join(out, f"rank{rank}"),
                      checkpoint_every=2, progress=False)
local, weights = record_step_terms(tr), []
tr.step_module.weighting.register_forward_hook(lambda m, args, result: weights.append(result[1]))
tr.fit(loader(n=16, distributed=True), 2)
rank_result(out, {"world_size": tr.world_size, "digest": digest(tr), "log": tr.history[-1], "local": local,
                  "weights": weights})
"""


@pytest.mark.slow
def test_two_gloo_ranks_train_one_multi_task_network_and_only_rank_0_writes(tmp_path, pyamalgam_env):
    r0, r1 = run_torchrun(SCRIPT, tmp_path, HERE, env=pyamalgam_env)
    assert r0["world_size"] == r1["world_size"] == 2
    assert (r0["digest"], r0["log"]["losses"]) == (r1["digest"], r1["log"]["losses"])
    # 16 images, 8 per rank, 4 a batch: 2 steps an epoch, 4 in 2 epochs
    assert r0["log"]["steps"] == 4 and len(r0["local"]) == len(r1["local"]) == 4
    assert r0["weights"] == r1["weights"] and r0["weights"][-1] != r0["weights"][0]  # DWA reweighted, alike
    # step 3's DWA weights, K softmax(r / 2) with r = L(step 2) / L(step 1), L the mean over the ranks
    l1, l2 = (torch.tensor([(r0["local"][i][f"{t}/label"] + r1["local"][i][f"{t}/label"]) / 2 for t in TASKS],
                           dtype=torch.float64) for i in (0, 1))
    assert list(r0["weights"][2].values()) == pytest.approx((3 * torch.softmax(l2 / l1 / 2, 0)).tolist(), rel=1e-5)
    assert {"kd", "sd/feature", "sd/output", "s/label", "seg/label"} <= set(r0["log"]["losses"])
    assert_logged_mean_over_ranks(r0["log"]["losses"], [r0["local"], r1["local"]], window=2)
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["last.safetensors", "mtl.jsonl"]
    assert not (tmp_path / "rank1").exists()

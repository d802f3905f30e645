"""The pair-wise-frames op (thesis 003, Eq. 5.2) vs its eager reference vs torch.compile(reference), CPU.

    pytest bench/test_temporal_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds \
        --benchmark-json=bench/results/raw-temporal-cpu.json
    python bench/report.py bench/results/raw-temporal-cpu.json

The issue-15 size: 19-class maps of 64x128 (N = 8192 nodes) for two frames of student and teacher,
forward+backward. The eager reference forms both N x N cross-frame affinity matrices (and their
gradients); the fused op is O(N C^2). ``test_pf_paired`` interleaves the three implementations
round after round (as bench/test_ops_bench.py), ``test_pf_scaling`` records the fused op at four
sizes (linear growth in N), ``test_pf_peak_memory`` the peak memory of one fwd+bwd. Under
--benchmark-disable every case runs once on tiny inputs.
"""
import statistics

import pytest
import torch
from _pairing import paired_rounds, peak_extra_bytes, ratios_over
from test_ops_bench import DEVICE

from pyamalgam import ops
from pyamalgam.ops import reference as ref

SIZE = (2, 19, 64, 128)  # B, C, H, W: N = 8192 nodes per frame
TINY = (1, 3, 5, 7)
IMPLS = ("fused", "eager", "compile")
_compiled = {}


def _impl(impl):
    if impl == "fused":
        return ops.pairwise_frames_loss
    if impl == "eager":
        return ref.pairwise_frames_loss
    if "pf" not in _compiled:
        _compiled["pf"] = torch.compile(ref.pairwise_frames_loss, fullgraph=True, dynamic=False)
    return _compiled["pf"]


def _step(impl, shape):
    """One fwd+bwd of ``impl`` on four fresh (B, C, H, W) maps (student and teacher, frames t and t+k)."""
    fn = _impl(impl)
    args = [torch.randn(shape).softmax(1).requires_grad_() for _ in range(4)]

    def step():
        fn(*args).backward()
        for a in args:
            a.grad = None

    step()  # compilation, for torch.compile
    return step


def _info(mode, shape):
    return {"op": "pairwise_frames_loss", "mode": mode, "shape": list(shape), "nodes": shape[2] * shape[3],
            "dtype": "float32", "device": DEVICE, "torch": torch.__version__}


def test_pf_paired(benchmark):
    """fused / eager / compile in turn, round after round; the median of the per-round ratios."""
    shape = TINY if benchmark.disabled else SIZE
    steps = {impl: _step(impl, shape) for impl in IMPLS}
    benchmark.group = f"paired: pairwise_frames_loss B{shape[0]} C{shape[1]} {shape[2]}x{shape[3]} fwd+bwd"
    seconds = paired_rounds(benchmark, steps)  # interleaved, as bench/test_ops_bench.py (bench/_pairing.py)
    info = _info("fwd+bwd", shape) | {"impl": "paired"}
    for impl in IMPLS:
        info[f"median_s_{impl}"] = statistics.median(seconds[impl])
    benchmark.extra_info.update(info | ratios_over(seconds))


@pytest.mark.parametrize("hw", [(32, 64), (64, 128), (128, 256), (256, 512)])
def test_pf_scaling(benchmark, hw):
    """N = 2k .. 131k nodes at B=1, C=19, fused fwd+bwd: the time must grow linearly."""
    shape = TINY if benchmark.disabled else (1, 19, *hw)
    step = _step("fused", shape)
    benchmark.group = "pairwise_frames scaling (fused, fwd+bwd, B1 C19)"
    benchmark.extra_info.update(_info("fwd+bwd", shape) | {"impl": "fused"})
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_pf_peak_memory(benchmark, impl, tmp_path, pyamalgam_env):
    """Peak resident memory one fwd+bwd adds, in a fresh process (Linux /proc)."""
    shape = TINY if benchmark.disabled else SIZE
    peak = benchmark.pedantic(lambda: peak_extra_bytes("pairwise_frames_loss", impl, [shape] * 4, [], tmp_path,
                                                       pyamalgam_env, softmax=True), rounds=1, iterations=1)
    benchmark.group = f"peak memory: pairwise_frames_loss B{shape[0]} C{shape[1]} {shape[2]}x{shape[3]} fwd+bwd"
    benchmark.extra_info.update(op="peak memory", case="pairwise_frames_loss", impl=impl, peak_extra_bytes=peak,
                                shape=list(shape))

"""Fused operators vs their eager reference vs torch.compile(reference), in one run (CPU).

    pytest bench/test_ops_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds \
        --benchmark-json=bench/results/raw-cpu.json
    python bench/report.py bench/results/raw-cpu.json     # tables into bench/results/

Each group holds the three implementations of one op, shape and mode (fwd or fwd+bwd), so the
ratios come from the same run on the same machine; ``test_op_paired`` runs them interleaved, round
after round, for ratios that a drifting machine cannot skew. ``test_pairwise_scaling`` records how the fused
pair-wise op grows from N = 1k to 64k nodes; ``test_peak_memory`` the peak memory of the pair-wise,
channel-wise and local pair-wise ops against their eager references.
"""
import platform

import pytest
import torch
from _pairing import ROUNDS, paired_rounds, peak_extra_bytes, ratios_over
from _pairing import iterations as _iterations

from pyamalgam import ops
from pyamalgam.ops import reference as ref

torch.manual_seed(0)
DEVICE = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


# Each case: (fused, reference, make(tiny) -> arguments, number of leading arguments that get
# gradients). Under --benchmark-disable (the CI smoke, .ci/run) every case runs once on tiny
# inputs: the point there is that the benchmarks still run, not their numbers.
TINY = (2, 8, 9, 7)


def _channel_coding(tiny, b=8, c=64, h=60, w=80):
    b, c, h, w = TINY if tiny else (b, c, h, w)
    r = c // 4
    return [torch.randn(b, c, h, w), torch.randn(r, c) * 0.1, torch.zeros(r), torch.randn(c, r) * 0.1, torch.zeros(c)]


def _maps(*shape, n=2):
    """``n`` random maps of ``shape`` (TINY when tiny)."""
    return lambda tiny: [torch.randn(TINY if tiny else shape) for _ in range(n)]


def _depth(tiny, b=8, h=240, w=320):
    b, _, h, w = TINY if tiny else (b, 1, h, w)
    return [torch.rand(b, h, w) * 10, torch.rand(b, h, w) * 10, torch.rand(b, h, w) > 0.1]


CASES = {
    "channel_coding B8 C64 60x80": (ops.channel_coding, ref.channel_coding, _channel_coding, 5),
    "soft_argmax_depth B4 Nd64 120x160": (
        lambda l: ops.soft_argmax_depth(l, 0.1), lambda l: ref.soft_argmax_depth(l, 0.1), _maps(4, 64, 120, 160, n=1), 1),
    "si_depth_loss B8 240x320": (ops.si_depth_loss, ref.si_depth_loss, _depth, 2),
    "pairwise_affinity_loss B4 C64 64x64": (ops.pairwise_affinity_loss, ref.pairwise_affinity_loss, _maps(4, 64, 64, 64), 2),
    # Thesis 003 at the sizes of issue 12: features B=8, C=128 at 64x64; 19-class logits at 128x256.
    # T = 3 (thesis §4.4.1); the local window of Fig. 3.3 (A), alpha = 9 (radius 1, patch 1).
    "channel_wise_loss B8 C128 64x64": (
        lambda s, t: ops.channel_wise_loss(s, t, 3.0), lambda s, t: ref.channel_wise_loss(s, t, 3.0),
        _maps(8, 128, 64, 64), 2),
    "channel_wise_loss B8 K19 128x256": (
        lambda s, t: ops.channel_wise_loss(s, t, 3.0), lambda s, t: ref.channel_wise_loss(s, t, 3.0),
        _maps(8, 19, 128, 256), 2),
    "pairwise_local_loss r1 B8 C128 64x64": (
        lambda s, t: ops.pairwise_local_loss(s, t, 1), lambda s, t: ref.pairwise_local_loss(s, t, 1),
        _maps(8, 128, 64, 64), 2),
}
_compiled = {}
IMPLS = ("fused", "eager", "compile")


def _impl(name, impl):
    fused, reference, _, _ = CASES[name]
    if impl == "fused":
        return fused
    if impl == "eager":
        return reference
    if name not in _compiled:
        _compiled[name] = torch.compile(reference, fullgraph=True, dynamic=False)
    return _compiled[name]


def _step(name, impl, mode, tiny=False):
    """One call of ``impl`` on fresh inputs of case ``name`` (and its backward for fwd+bwd)."""
    fn = _impl(name, impl)
    _, _, make, n_grad = CASES[name]
    args = make(tiny)
    if mode == "fwd+bwd":
        for a in args[:n_grad]:
            a.requires_grad_()

    def step():
        out = fn(*args)
        if mode == "fwd+bwd":
            out.sum().backward()
            for a in args[:n_grad]:
                a.grad = None
        return out

    step()  # compilation, for torch.compile
    return step, args


def _info(name, mode, args):
    # op: the words before the shape, e.g. "pairwise_local_loss r1"
    return {"op": name.split(" B")[0], "mode": mode, "shape": list(args[0].shape),
            "dtype": str(args[0].dtype).removeprefix("torch."), "device": DEVICE, "torch": torch.__version__}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_op(benchmark, name, impl, mode):
    step, args = _step(name, impl, mode, tiny=benchmark.disabled)
    benchmark.group = f"{name} {mode}"
    benchmark.extra_info.update(impl=impl, **_info(name, mode, args))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=_iterations(benchmark, step))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_paired(benchmark, name, mode):
    """The three implementations in turn, round after round, and the median of the per-round ratios.

    test_op times one implementation after the other, so a shared machine whose speed drifts
    between them (it does, by 2x at times) skews their ratios; interleaving cancels the drift
    (bench/_pairing.py: each turn in a round starts with one untimed call).
    """
    made = {impl: _step(name, impl, mode, tiny=benchmark.disabled) for impl in IMPLS}
    benchmark.group = f"paired: {name} {mode}"
    seconds = paired_rounds(benchmark, {impl: step for impl, (step, _) in made.items()})
    benchmark.extra_info.update(_info(name, mode, made["fused"][1]) | {"impl": "paired"} | ratios_over(seconds))


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (128, 128), (256, 256)])
def test_pairwise_scaling(benchmark, hw):
    """N = 1024 .. 65536 nodes at B=1, C=64, forward+backward: the time must grow linearly."""
    fs, ft = [t.requires_grad_() for t in _maps(1, 64, *hw)(tiny=False)]

    def step():
        ops.pairwise_affinity_loss(fs, ft).backward()

    step()
    benchmark.group = "pairwise scaling (fused, fwd+bwd, B1 C64)"
    benchmark.extra_info.update(op="pairwise scaling", nodes=hw[0] * hw[1])
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)


# case -> (op of pyamalgam.ops and of the reference, its input shapes, its other arguments)
PEAK_CASES = {
    "pairwise_affinity_loss B4 C64 64x64": ("pairwise_affinity_loss", [(4, 64, 64, 64)] * 2, [1]),
    "channel_wise_loss B8 C128 64x64": ("channel_wise_loss", [(8, 128, 64, 64)] * 2, [3.0]),
    "channel_wise_loss B8 K19 128x256": ("channel_wise_loss", [(8, 19, 128, 256)] * 2, [3.0]),
    "pairwise_local_loss r1 B8 C128 64x64": ("pairwise_local_loss", [(8, 128, 64, 64)] * 2, [1]),
}


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("name", list(PEAK_CASES))
def test_peak_memory(benchmark, name, impl, tmp_path, pyamalgam_env):
    """Peak resident memory that one fwd+bwd adds (both inputs get gradients), sampled every 0.5 ms
    in a fresh process (Linux /proc)."""
    op, shapes, args = PEAK_CASES[name]
    shapes = [TINY] * len(shapes) if benchmark.disabled else shapes
    peak = benchmark.pedantic(lambda: peak_extra_bytes(op, impl, shapes, args, tmp_path, pyamalgam_env), rounds=1,
                              iterations=1)
    benchmark.group = f"peak memory: {name} fwd+bwd"
    benchmark.extra_info.update(op="peak memory", case=name, impl=impl, peak_extra_bytes=peak, shape=list(shapes[0]))

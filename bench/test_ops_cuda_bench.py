"""CUDA benchmarks of the fused operators against the eager reference and torch.compile(reference).

Run on a machine with a GPU and a CUDA build of pyamalgam:

    python -m pytest bench/test_ops_cuda_bench.py --benchmark-json bench/results/raw.json
    python bench/report.py bench/results/raw.json

Every benchmark times `inner` back-to-back calls between two CUDA events (device time, no host
synchronisation inside the loop) and stores the per-call median in ``extra_info["median_ms"]``;
pytest-benchmark's own wall-clock statistics cover the same loop plus one synchronisation.
The device's copy bandwidth (a large ``dst.copy_(src)``) is measured in the same session and
stored in every record, so bench/report.py can express each op's bandwidth as a share of it.

``extra_info["bytes"]`` is the DRAM traffic the fused algorithm needs (see ``_bytes``); GB/s and
"% of copy" are computed from it for every implementation, so they compare like with like.
"""
from __future__ import annotations

import statistics

import pytest
import torch

pytest.importorskip("pytest_benchmark")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import pyamalgam  # noqa: E402

if not pyamalgam.build_info()["with_cuda"]:
    pytest.skip("this pyamalgam build has no CUDA kernels", allow_module_level=True)

from pyamalgam import ops  # noqa: E402
from pyamalgam.ops import reference as ref  # noqa: E402

DEV = "cuda"
ROUNDS = 15


def _device_ms(fn, inner: int, rounds: int = ROUNDS) -> list[float]:
    """Per-call device times (ms) of `rounds` loops of `inner` calls."""
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return times


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device copy bandwidth in GB/s (bytes read + bytes written per second), 1 GiB buffers."""
    n = (1 << 30) // 4
    src = torch.empty(n, dtype=torch.float32, device=DEV).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ms = statistics.median(_device_ms(lambda: dst.copy_(src), inner=5, rounds=10))
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def _common_info(benchmark, copy_bandwidth):
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark.extra_info["copy_gbps"] = copy_bandwidth
    benchmark.extra_info["torch"] = torch.__version__


def test_copy_bandwidth(benchmark, copy_bandwidth):
    """A record of the copy itself (op "copy"), 256 MiB."""
    n = (256 << 20) // 4
    src = torch.empty(n, device=DEV).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    _run(benchmark, fn, copy_bandwidth, op="copy", shape=(n,), dtype=torch.float32, impl="copy", mode="fwd",
         nbytes=2 * n * 4, layout="contiguous")


def _run(benchmark, fn, copy_bandwidth, *, op, shape, dtype, impl, mode, nbytes, layout):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # Enough calls per loop for ~2 ms, so that launch gaps and the event overhead amortise.
    once = statistics.median(_device_ms(fn, inner=1, rounds=3))
    inner = max(1, min(200, int(2.0 / max(once, 1e-3))))

    def loop():
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"{op} {mode} {layout} {tuple(shape)} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(loop, rounds=5, iterations=1, warmup_rounds=1)
    ms = statistics.median(_device_ms(fn, inner))
    _common_info(benchmark, copy_bandwidth)
    benchmark.extra_info.update(
        op=op,
        shape=list(shape),
        dtype=str(dtype).replace("torch.", ""),
        impl=impl,
        mode=mode,
        layout=layout,
        inner=inner,
        median_ms=ms,
        bytes=nbytes,
        gbps=nbytes / (ms * 1e-3) / 1e9,
    )
    benchmark.extra_info["pct_of_copy"] = 100.0 * benchmark.extra_info["gbps"] / copy_bandwidth


# ---------------------------------------------------------------------------------------------
# What is measured

IMPLS = {"fused": ops, "eager": ref, "compile": None}


def _impl_fn(impl: str, name: str):
    if impl == "compile":
        # Dynamo caches per code object, with a recompile limit: start from a clean cache for
        # every benchmark, so that no variant silently falls back to eager.
        torch._dynamo.reset()
        return torch.compile(getattr(ref, name), fullgraph=True, dynamic=False)
    return getattr(IMPLS[impl], name)


def _bytes(op, mode, shape, dtype, masked=True):
    """DRAM bytes the fused kernels move (compulsory traffic of the fused algorithm)."""
    s = torch.tensor([], dtype=dtype).element_size()
    if op == "channel_coding":
        n = shape[0] * shape[1] * shape[2] * shape[3]
        fwd = 3 * n * s  # reduction pass reads x; rescale reads x and writes out
        bwd = 4 * n * s  # reduction pass reads x and grad; rescale reads grad and writes grad_x
    elif op == "soft_argmax_depth":
        b, k, h, w = shape
        fwd = (b * k * h * w + b * h * w) * s  # logits once, depth once
        bwd = (2 * b * k * h * w + b * h * w) * s  # logits once (cached), grad, grad_logits
    else:
        b, h, w = shape
        px = b * h * w
        per = 2 * s + (1 if masked else 0)  # pred, target, mask
        fwd = px * per
        bwd = 2 * px * per + 2 * px * s  # moments pass + gradient pass, two gradients written
    return fwd if mode == "fwd" else fwd + bwd


def _forward_backward(fn, inputs, grad_out):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad_out)

    return run


def _bench(benchmark, copy_bandwidth, op, impl, mode, shape, dtype, layout, make_inputs, call):
    inputs = make_inputs()
    fn = _impl_fn(impl, op)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(fn, inputs)
    else:
        out = call(fn, inputs)
        run = _forward_backward(lambda: call(fn, inputs), inputs, torch.ones_like(out))
    _run(benchmark, run, copy_bandwidth, op=op, shape=shape, dtype=dtype, impl=impl, mode=mode,
         nbytes=_bytes(op, mode, shape, dtype), layout=layout)


MODES = ["fwd", "fwd+bwd"]

# Issue 3: B = 8, C = 64..512, H x W from 30 x 40 to 240 x 320.
CC_SHAPES = [(8, 64, 30, 40), (8, 512, 30, 40), (8, 256, 120, 160), (8, 64, 240, 320), (8, 512, 240, 320)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channel_coding(benchmark, copy_bandwidth, impl, mode, shape, dtype):
    _channel_coding(benchmark, copy_bandwidth, impl, mode, shape, dtype, "contiguous")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(8, 256, 120, 160)], ids=lambda s: "x".join(map(str, s)))
def test_channel_coding_channels_last(benchmark, copy_bandwidth, impl, mode, shape):
    _channel_coding(benchmark, copy_bandwidth, impl, mode, shape, torch.float32, "channels_last")


def _channel_coding(benchmark, copy_bandwidth, impl, mode, shape, dtype, layout):
    b, c, h, w = shape
    r = max(1, c // 16)

    def make():
        x = torch.randn(b, c, h, w, device=DEV, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        ws = [torch.randn(r, c), torch.randn(r), torch.randn(c, r), torch.randn(c)]
        ws = [(t / c**0.5).to(device=DEV, dtype=dtype) for t in ws]
        grad = mode != "fwd"
        return [x.requires_grad_(grad)] + [t.requires_grad_(grad) for t in ws]

    _bench(benchmark, copy_bandwidth, "channel_coding", impl, mode, shape, dtype, layout, make, lambda f, a: f(*a))


SAD_SHAPES = [(8, 64, 120, 160), (8, 64, 240, 320), (8, 128, 240, 320)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_soft_argmax_depth(benchmark, copy_bandwidth, impl, mode, shape, dtype, layout):
    def make():
        logits = torch.randn(*shape, device=DEV, dtype=dtype) * 3
        if layout == "channels_last":
            logits = logits.to(memory_format=torch.channels_last)
        return [logits.requires_grad_(mode != "fwd")]

    _bench(benchmark, copy_bandwidth, "soft_argmax_depth", impl, mode, shape, dtype, layout, make,
           lambda f, a: f(a[0], 0.1))


SI_SHAPES = [(8, 240, 320), (8, 480, 640), (32, 480, 640)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SI_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_si_depth_loss(benchmark, copy_bandwidth, impl, mode, shape, dtype):
    def make():
        pred = (torch.rand(*shape, device=DEV) * 5).to(dtype).requires_grad_(mode != "fwd")
        target = (torch.rand(*shape, device=DEV) * 5).to(dtype).requires_grad_(mode != "fwd")
        mask = torch.rand(*shape, device=DEV) < 0.7
        return [pred, target, mask]

    _bench(benchmark, copy_bandwidth, "si_depth_loss", impl, mode, shape, dtype, "contiguous", make,
           lambda f, a: f(*a))

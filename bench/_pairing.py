"""What the CPU op benchmarks share (bench/test_ops_bench.py, bench/test_temporal_bench.py): the
calls per timed round, the paired rounds that interleave the implementations, and the peak
memory of one fwd+bwd in a fresh process.

Paired rounds: timing one implementation after the other lets a shared machine whose speed
drifts between them (it does, by 2x at times) skew their ratios; interleaving them round after
round cancels the drift, and the ratios are taken per round.
"""
import json
import statistics
import subprocess
import sys
import time

ROUNDS = 7


def iterations(benchmark, step, warmup_s=0.3, round_s=0.02):
    """Calls per timed round, after a warm-up of ``warmup_s``.

    The first calls of a fresh process run several times slower (the heap grows, pages fault in,
    OpenMP threads start), and single sub-millisecond calls on a shared VM are mostly noise; so
    every implementation is warmed up for the same time and each round lasts ``round_s`` or more.
    """
    if benchmark.disabled:
        return 1
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < warmup_s:
        step()
        calls += 1
    return max(1, round(round_s / ((time.perf_counter() - start) / calls)))


def paired_rounds(benchmark, steps: dict) -> dict:
    """Run ``steps`` (implementation -> step) in turn, :data:`ROUNDS` rounds under ``benchmark``;
    implementation -> seconds per call, one value per round.

    Each implementation's turn in a round starts with one untimed call: the previous one left
    cold caches, sleeping OpenMP threads and a churned heap (the eager pair-wise references move
    GBs), which the implementation timed right after it would pay for, whichever it is.
    """
    calls = {impl: iterations(benchmark, step) for impl, step in steps.items()}
    seconds = {impl: [] for impl in steps}

    def one_round():
        for impl, step in steps.items():
            step()  # untimed
            start = time.perf_counter()
            for _ in range(calls[impl]):
                step()
            seconds[impl].append((time.perf_counter() - start) / calls[impl])

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    return seconds


def ratios_over(seconds: dict, base: str = "fused") -> dict:
    """``paired_<impl>_over_<base>``: [q1, median, q3] of the per-round ratios, for every other impl."""
    info = {}
    for impl, times in seconds.items():
        if impl != base:
            ratios = [other / ref for other, ref in zip(times, seconds[base])]
            q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            info[f"paired_{impl}_over_{base}"] = [q1, median, q3]
    return info


_PEAK = r"""
import json, os, sys, threading, torch
from pyamalgam import ops
from pyamalgam.ops import reference as ref
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
spec, impl = json.loads(sys.argv[1]), sys.argv[2]
fn = getattr(ops if impl == "fused" else ref, spec["op"])
fn(*[torch.randn(s) for s in spec["warm"]], *spec["args"])  # load lazily initialised code first
make = (lambda s: torch.randn(s).softmax(1).requires_grad_()) if spec["softmax"] else (
    lambda s: torch.randn(s, requires_grad=True))
inputs = [make(s) for s in spec["shapes"]]
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        done.wait(0.0005)
t = threading.Thread(target=sample); t.start()
fn(*inputs, *spec["args"]).backward()
done.set(); t.join()
print(json.dumps({"peak_extra_bytes": max(peak[0], rss()) - before}))
"""


def peak_extra_bytes(op: str, impl: str, shapes, args, cwd, env, *, softmax: bool = False) -> int:
    """Peak resident memory that one fwd+bwd of ``pyamalgam.ops.<op>`` (``impl`` "fused") or of
    its reference adds (every input gets gradients; ``softmax``: inputs are class probabilities),
    sampled every 0.5 ms in a fresh process (Linux /proc)."""
    spec = json.dumps({"op": op, "shapes": [list(s) for s in shapes], "args": list(args), "softmax": softmax,
                       "warm": [(1, 2, 2, 2)] * len(shapes)})
    out = subprocess.run([sys.executable, "-c", _PEAK, spec, impl], capture_output=True, text=True, check=True,
                         cwd=cwd, env=env)
    return json.loads(out.stdout)["peak_extra_bytes"]

"""Rendering throughput of SyntheticScenes (images/s, one process, no cache).

    pytest bench/test_data_bench.py --benchmark-columns=median,iqr,rounds

Each round renders a batch of distinct samples; images/s = batch / median round time, reported in
``extra_info["images_per_s"]`` (and ``--benchmark-json``). Numbers for docs/data.md come from here.
"""
import pytest

from pyamalgam.data import SyntheticScenes

CASES = {"64x80": ((64, 80), 16), "240x320": ((240, 320), 4)}


@pytest.mark.parametrize("name", list(CASES))
def test_synthetic_render_throughput(benchmark, name):
    resolution, batch = CASES[name]
    ds = SyntheticScenes("train", size=10_000, resolution=resolution, seed=0)
    state = {"start": 0}

    def render_batch():
        # distinct indices each round: scenes differ in object count, so average over many
        lo = state["start"]
        state["start"] = (lo + batch) % len(ds)
        for i in range(lo, lo + batch):
            ds[i]

    benchmark.group = "SyntheticScenes render"
    benchmark.pedantic(render_batch, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info["resolution"] = resolution
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
        assert benchmark.extra_info["images_per_s"] > 0

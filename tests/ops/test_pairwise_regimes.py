"""The pair-wise op is exact in every regime, and linear in the number of nodes."""
import json
import subprocess
import sys

import pytest
import torch

from pyamalgam import ops
from pyamalgam.ops import reference as ref


def _rel_err(fs, ft, patch=1):
    got = ops.pairwise_affinity_loss(fs, ft, patch).double()
    want = ref.pairwise_affinity_loss(fs.double(), ft.double(), patch)
    return ((got - want).abs() / want.abs()).item(), want.item()


@pytest.mark.parametrize("noise", [1e-1, 1e-3, 1e-5])
def test_exact_when_student_nearly_equals_teacher(noise):
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(2, 16, 24, 20, generator=g)
    fs = ft + noise * torch.randn(ft.shape, generator=g)
    err, value = _rel_err(fs, ft)
    assert value < 1.0 and value > 0
    assert err <= 1e-4, (err, value)


@pytest.mark.parametrize("noise", [1e-2, 1e-4])
@pytest.mark.parametrize("cs,ct", [(24, 16), (16, 24)])
def test_exact_when_student_is_a_rotated_teacher(noise, cs, ct):
    """Different channel counts, same affinities up to noise: what a converged student looks like."""
    g = torch.Generator().manual_seed(1)
    small, big = min(cs, ct), max(cs, ct)
    q = torch.linalg.qr(torch.randn(big, big, generator=g, dtype=torch.float64))[0][:small]  # orthonormal rows
    base = torch.randn(2, small, 20, 22, generator=g, dtype=torch.float64)
    rotated = torch.einsum("bchw,cd->bdhw", base, q)
    fs, ft = (base, rotated) if cs == small else (rotated, base)
    fs = (fs + noise * torch.randn(fs.shape, generator=g, dtype=torch.float64)).float()
    err, _ = _rel_err(fs, ft.float(), patch=2)
    assert err <= 1e-4


def test_the_naive_gram_expansion_would_fail_here():
    """Guards the test above: the linear-time Gram formula without alignment loses the digits."""
    g = torch.Generator().manual_seed(2)
    ft = torch.randn(2, 16, 24, 20, generator=g)
    fs = ft + 1e-5 * torch.randn(ft.shape, generator=g)
    s = ref.normalize_nodes(ref.pool_nodes(fs, 1))
    t = ref.normalize_nodes(ref.pool_nodes(ft, 1))
    gram = lambda a, b: (a.transpose(1, 2) @ b).square().sum(dim=(1, 2))  # noqa: E731
    naive = ((gram(s, s) - 2 * gram(s, t) + gram(t, t)) / s.shape[1] ** 2).mean()
    want = ref.pairwise_affinity_loss(fs.double(), ft.double())
    assert abs(naive.item() - want.item()) / want.item() > 1e-2


def test_ragged_patches_average_what_they_have():
    """Node pooling against an explicit loop over cells (independent of avg_pool2d)."""
    f = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    patch = 3
    nodes = []
    for i in range(0, 5, patch):
        for j in range(0, 7, patch):
            nodes.append(f[0, :, i : i + patch, j : j + patch].mean(dim=(1, 2)))
    nodes = torch.stack(nodes)[None]
    unit = nodes / nodes.norm(dim=-1, keepdim=True)
    a = unit @ unit.transpose(1, 2)
    ft = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    t = ref.normalize_nodes(ref.pool_nodes(ft, patch))
    want = ((a - t @ t.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(ops.pairwise_affinity_loss(f, ft, patch), want)


_BIG = r"""
import json, resource, time, torch
from pyamalgam import ops
torch.manual_seed(0)
fs = torch.randn(2, 64, 256, 512, requires_grad=True)
ft = torch.randn(2, 64, 256, 512, requires_grad=True)
t0 = time.perf_counter()
loss = ops.pairwise_affinity_loss(fs, ft)
loss.backward()
print(json.dumps({"loss": loss.item(), "seconds": time.perf_counter() - t0,
                  "grad_finite": bool(torch.isfinite(fs.grad).all() and torch.isfinite(ft.grad).all()),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
def test_a_256x512_map_fits_where_the_reference_cannot(tmp_path, pyamalgam_env):
    """N = 131072 nodes: each N x N float32 affinity matrix alone would be 68 GB."""
    # From a temp dir: `python -c` puts the cwd first on sys.path, and the source tree may hold no build.
    out = subprocess.run([sys.executable, "-c", _BIG], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=pyamalgam_env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grad_finite"] and 0 < r["loss"] < 1
    assert r["peak_rss_gb"] < 6, r  # linear memory: inputs + grads are 0.5 GB, float64 nodes 0.3 GB


def test_time_grows_linearly_in_nodes():
    """N x16 must cost far less than x256 (what a quadratic op would take).

    Linear would be x16; the bound leaves x4 for cache effects (the small map fits in L2, the large
    one does not) and for a busy 2-core machine, and a quadratic op would still fail it by x4.
    """
    import time

    def t(hw):
        fs, ft = torch.randn(1, 32, *hw), torch.randn(1, 32, *hw)
        ops.pairwise_affinity_loss(fs, ft)
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()  # CPU time: another process on the machine does not count
            ops.pairwise_affinity_loss(fs, ft)
            best = min(best, time.process_time() - t0)
        return best

    small, large = t((32, 32)), t((128, 128))  # N = 1024 -> 16384
    assert large / small < 64, (small, large)

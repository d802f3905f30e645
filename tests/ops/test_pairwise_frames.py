"""The pair-wise-frames op (thesis 003, Eq. 5.2) against its float64 reference (both N x N
cross-frame affinity matrices), in the near-teacher regimes where a plain Gram expansion cancels,
gradcheck, opcheck, torch.compile(fullgraph=True), edge cases, bad input, and its linear cost."""
import time

import pytest
import torch
from _cases import as_layout, assert_matches_reference

from pyamalgam import ops
from pyamalgam._testing import assert_compiled_matches
from pyamalgam.ops import reference as ref
from pyamalgam.ops.pairwise_frames import _pairwise_frames_generic

F64 = torch.float64
P = torch.ops.pyamalgam
SHAPES = [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 9), (3, 16, 4, 5), (1, 5, 13, 1), (2, 4, 6, 11)]


def _rand(*shape, seed=0, dtype=F64, scale=1.0):
    return (torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _frames(b, cs, ct, h, w, seed=0, dtype=F64):
    """fs_t, fs_k, ft_t, ft_k: four independent maps."""
    return [_rand(b, c, h, w, seed=seed + i, dtype=dtype) for i, c in enumerate((cs, cs, ct, ct))]


def _req(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# --- against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("patch", [1, 2, 3])
@pytest.mark.parametrize("dc", [0, 2, -1], ids=["same_c", "teacher_wider", "student_wider"])
def test_matches_reference(shape, patch, dc):
    b, c, h, w = shape
    args = _frames(b, c, max(1, c + dc), h, w, seed=1)
    assert_matches_reference(lambda *a: ops.pairwise_frames_loss(*a, patch), lambda *a: ref.pairwise_frames_loss(*a, patch),
                             args, rtol=1e-9, atol=1e-12)


def test_identical_frames_give_the_single_frame_loss():
    """With frame t+k = frame t, Eq. 5.2 is Eq. 3.2 on the full graph (an independent fused op)."""
    fs, ft = _rand(2, 5, 9, 7, seed=2), _rand(2, 3, 9, 7, seed=3)
    for patch in (1, 2):
        torch.testing.assert_close(ops.pairwise_frames_loss(fs, fs, ft, ft, patch), ops.pairwise_affinity_loss(fs, ft, patch),
                                   rtol=1e-10, atol=1e-14)


def test_device_generic_path_matches_the_reference():
    """What the op runs on CUDA (no kernel there), here on CPU tensors: values and gradients."""
    for cs, ct, patch in ((3, 5, 1), (6, 2, 2), (4, 4, 3)):
        args = _frames(2, cs, ct, 9, 7, seed=4)
        assert_matches_reference(lambda *a: _pairwise_frames_generic(*a, patch), lambda *a: ref.pairwise_frames_loss(*a, patch),
                                 args, rtol=1e-9, atol=1e-12)
    empty = _frames(0, 2, 3, 4, 4)
    assert _pairwise_frames_generic(*empty, 1).item() == 0.0


# --- the regimes where the linear-time Gram expansion loses every digit -----------------------------------

def _rel_err(args, patch=1):
    got = ops.pairwise_frames_loss(*args, patch).double()
    want = ref.pairwise_frames_loss(*[a.double() for a in args], patch)
    return ((got - want).abs() / want.abs()).item(), want.item()


@pytest.mark.parametrize("noise", [1e-1, 1e-3, 1e-5])
def test_exact_when_student_nearly_equals_teacher(noise):
    g = torch.Generator().manual_seed(5)
    ft_t, ft_k = torch.randn(2, 16, 24, 20, generator=g), torch.randn(2, 16, 24, 20, generator=g)
    fs_t, fs_k = (f + noise * torch.randn(f.shape, generator=g) for f in (ft_t, ft_k))
    err, value = _rel_err([fs_t, fs_k, ft_t, ft_k])
    assert 0 < value < 1
    assert err <= 1e-4, (err, value)


@pytest.mark.parametrize("noise", [1e-2, 1e-4])
@pytest.mark.parametrize("cs,ct", [(24, 16), (16, 24), (19, 19)])
def test_exact_when_student_is_a_rotated_teacher(noise, cs, ct):
    """Different channels, the same cross-frame affinities up to noise: a converged student."""
    g = torch.Generator().manual_seed(6)
    small, big = min(cs, ct), max(cs, ct)
    q = torch.linalg.qr(torch.randn(big, big, generator=g, dtype=F64))[0][:small]  # orthonormal rows
    base = [torch.randn(2, small, 20, 22, generator=g, dtype=F64) for _ in range(2)]
    rotated = [torch.einsum("bchw,cd->bdhw", f, q) for f in base]
    student, teacher = (base, rotated) if cs == small else (rotated, base)
    student = [(f + noise * torch.randn(f.shape, generator=g, dtype=F64)).float() for f in student]
    err, _ = _rel_err([*student, *[f.float() for f in teacher]], patch=2)
    assert err <= 1e-4, err


def test_the_naive_gram_expansion_would_fail_here():
    """Guards the two tests above: the O(N C^2) Gram formula without alignment loses the digits."""
    g = torch.Generator().manual_seed(7)
    ft_t, ft_k = torch.randn(2, 16, 24, 20, generator=g), torch.randn(2, 16, 24, 20, generator=g)
    fs_t, fs_k = (f + 1e-5 * torch.randn(f.shape, generator=g) for f in (ft_t, ft_k))
    n = lambda f: ref.normalize_nodes(ref.pool_nodes(f, 1))  # noqa: E731
    st, sk, tt, tk = n(fs_t), n(fs_k), n(ft_t), n(ft_k)
    inner = lambda a, b: (a * b).sum(dim=(1, 2))  # noqa: E731
    gram = lambda x, y: x.transpose(1, 2) @ y  # noqa: E731
    naive = (inner(gram(st, st), gram(sk, sk)) - 2 * inner(gram(tt, st), gram(tk, sk)) + inner(gram(tt, tt), gram(tk, tk)))
    naive = (naive / st.shape[1] ** 2).mean()
    want = ref.pairwise_frames_loss(fs_t.double(), fs_k.double(), ft_t.double(), ft_k.double())
    assert abs(naive.item() - want.item()) / want.item() > 1e-2


# --- edge cases, layouts, dtypes ---------------------------------------------------------------------------

def test_empty_batch_or_map_gives_zero_and_zero_gradients():
    for b, h in ((0, 4), (2, 0)):
        args = _req(*_frames(b, 3, 2, h, 4))
        loss = ops.pairwise_frames_loss(*args)
        loss.backward()
        assert loss.item() == 0.0
        for a in args:
            assert a.grad.shape == a.shape and not a.grad.any()


def test_zero_nodes_identical_inputs_and_nan():
    z = torch.zeros(1, 2, 3, 3, dtype=F64)
    z[0, 0, 0, 0] = 1.0  # one non-zero node among zero nodes
    args = [z, _rand(1, 2, 3, 3, seed=8), _rand(1, 3, 3, 3, seed=9), _rand(1, 3, 3, 3, seed=10)]
    assert_matches_reference(ops.pairwise_frames_loss, ref.pairwise_frames_loss, args, rtol=1e-10, atol=1e-12)
    f = _frames(2, 3, 3, 4, 5, seed=11)
    assert ops.pairwise_frames_loss(f[0], f[1], f[0].clone(), f[1].clone()).item() < 1e-28
    f[2][0, 0, 1, 1] = float("nan")
    assert ops.pairwise_frames_loss(*f).isnan()  # reaches the loss; the SVD does not fail on it


def test_patch_beyond_the_map_is_one_node():
    args = _frames(2, 3, 4, 7, 5, seed=12)
    torch.testing.assert_close(ops.pairwise_frames_loss(*args, 2**62), ops.pairwise_frames_loss(*args, 7))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    args = _frames(2, 5, 3, 6, 7, seed=13)
    for i in range(4):
        moved = [as_layout(a, layout) if j == i else a for j, a in enumerate(args)]
        out = assert_matches_reference(lambda *a: ops.pairwise_frames_loss(*a, 2), lambda *a: ref.pairwise_frames_loss(*a, 2),
                                       moved, rtol=1e-9, atol=1e-12)
        assert out.shape == ()
    cl = _req(*[as_layout(a, "channels_last") for a in args])
    ops.pairwise_frames_loss(*cl).backward()
    assert all(a.grad.is_contiguous(memory_format=torch.channels_last) for a in cl)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_against_float64(dtype, tol):
    args = _frames(2, 4, 6, 9, 8, seed=14, dtype=dtype)
    out = ops.pairwise_frames_loss(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.pairwise_frames_loss(*[a.double() for a in args]), rtol=tol, atol=tol)
    req = _req(*args)
    ops.pairwise_frames_loss(*req).backward()
    assert all(a.grad.dtype == dtype and a.grad.isfinite().all() for a in req)


# --- autograd, opcheck, compile -------------------------------------------------------------------------

CASES = [("c3_c2_p1", (2, 3, 2, 5, 7), 1), ("c2_c4_p2", (1, 2, 4, 5, 6), 2), ("c3_c3_p3", (2, 3, 3, 4, 7), 3)]


@pytest.mark.parametrize("shape, patch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gradcheck(shape, patch):
    args = _req(*_frames(*shape, seed=15))
    assert torch.autograd.gradcheck(lambda *a: ops.pairwise_frames_loss(*a, patch), args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # The direct call of the plain overload (its backward runs the forward again).
    assert torch.autograd.gradcheck(lambda *a: P.pairwise_frames_loss(*a, patch), args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape, patch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opcheck(shape, patch):
    args = _req(*_frames(*shape, seed=16))
    torch.library.opcheck(P.pairwise_frames_loss.default, (*args, patch))
    torch.library.opcheck(P.pairwise_frames_loss_for_backward.default, (*args, patch))
    plain = [a.detach() for a in args]
    g = torch.tensor(0.5, dtype=F64)
    torch.library.opcheck(P.pairwise_frames_loss_backward.default, (g, *plain, patch))
    saved = P.pairwise_frames_loss_for_backward(*plain, patch)[1:]
    torch.library.opcheck(P.pairwise_frames_loss_saved_backward.default, (g, *plain, *saved, patch))


def test_the_forward_keeps_no_n_by_n_matrix():
    """What the API's forward saves for the backward: the maps and O(N C) node rows, no N x N."""
    b, c, h, w = 1, 4, 16, 16
    n = h * w
    args = _req(*_frames(b, c, c, h, w, seed=17))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        ops.pairwise_frames_loss(*args)
    assert shapes and all(torch.Size(s).numel() <= 2 * b * n * 2 * c for s in shapes), shapes


def _pf_and_pair(a, b_, c, d, fs, ft):
    return ops.pairwise_frames_loss(a, b_, c, d, 2) + 0.5 * ops.pairwise_affinity_loss(fs, ft)


def _pf_and_pair_reference(a, b_, c, d, fs, ft):
    return ref.pairwise_frames_loss(a, b_, c, d, 2) + 0.5 * ref.pairwise_affinity_loss(fs, ft)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    args = (*_frames(2, 4, 3, 6, 5, seed=18, dtype=torch.float32), torch.randn(2, 3, 5, 4), torch.randn(2, 2, 5, 4))
    assert_compiled_matches(_pf_and_pair, _pf_and_pair_reference, args, backend)


# --- bad input (Python API; direct calls: tests/robustness/test_direct_ops.py) ---------------------------

def _ok():
    return _frames(2, 3, 4, 5, 6)


@pytest.mark.parametrize("call, err, pattern", [
    (lambda: ops.pairwise_frames_loss(_rand(2, 3, 5), *_ok()[1:]), ValueError, r"fs_t must have 4 dimensions"),
    (lambda: ops.pairwise_frames_loss(*_ok()[:3], "x"), TypeError, r"ft_k must be a torch.Tensor"),
    (lambda: ops.pairwise_frames_loss(_ok()[0], _rand(2, 3, 5, 5), *_ok()[2:]), ValueError,
     r"fs_k must have shape \(2, 3, 5, 6\) \(the shape of fs_t\)"),
    (lambda: ops.pairwise_frames_loss(*_ok()[:3], _rand(2, 3, 5, 6)), ValueError, r"ft_k must have shape \(2, 4, 5, 6\)"),
    (lambda: ops.pairwise_frames_loss(*_ok()[:2], _rand(1, 4, 5, 6), _rand(1, 4, 5, 6)), ValueError,
     r"fs_t and ft_t must have the same batch and spatial sizes"),
    (lambda: ops.pairwise_frames_loss(*_ok()[:3], _ok()[3].float()), ValueError, r"ft_k must have the same dtype as fs_t"),
    (lambda: ops.pairwise_frames_loss(*[a.long() for a in _ok()]), TypeError, r"fs_t must be a floating"),
    (lambda: ops.pairwise_frames_loss(*_ok(), 0), ValueError, r"patch must be >= 1"),
    (lambda: ops.pairwise_frames_loss(*_ok(), 1.5), TypeError, r"patch must be an int"),
])
def test_python_api_bad_input_names_the_argument(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()


# --- linear cost ---------------------------------------------------------------------------------------------

def test_time_grows_linearly_in_nodes():
    """N x16 must cost far less than x256 (a quadratic op); the bound leaves x4 for caches. CPU time
    of the process, not wall time: on a shared machine a niced run is descheduled at random."""
    def best(hw):
        args = _req(*_frames(1, 19, 19, *hw, dtype=torch.float32))
        step = lambda: ops.pairwise_frames_loss(*args).backward()  # noqa: E731
        step()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return min(times)

    small, large = best((16, 32)), best((64, 128))  # N = 512 -> 8192, the size
    assert large / small < 64, (small, large)

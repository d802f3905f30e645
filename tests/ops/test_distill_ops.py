"""The fused distillation ops of thesis 003 (CPU): channel_wise_loss (Eqs. 4.3-4.4) and
pairwise_local_loss (Eq. 3.2, local window) against float64 references that materialise
everything (both softmaxes; both N x N affinity matrices and the window mask), gradcheck, opcheck,
torch.compile(fullgraph=True), bad input, direct torch.ops calls and the local op's memory."""
import json
import subprocess
import sys

import pytest
import torch
from _cases import as_layout, assert_matches_reference, conformance_tests
from torch._subclasses.fake_tensor import FakeTensorMode

from pyamalgam import ops
from pyamalgam._testing import assert_compiled_matches, subprocess_env
from pyamalgam.ops import reference as ref
from pyamalgam.ops.channel_wise import _channel_wise_generic
from pyamalgam.ops.pairwise_local import _pairwise_local_generic

F64 = torch.float64
P = torch.ops.pyamalgam
SHAPES = [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 9), (3, 16, 4, 5), (1, 5, 13, 1), (2, 4, 6, 11)]
# (radius, patch): alpha = 1 (the diagonal only), 3x3, 5x5 at beta 2x2, beta 3x3 (H, W not divisible),
# and a window larger than any map here.
WINDOWS = [(0, 1), (1, 1), (2, 2), (1, 3), (40, 1)]


def _rand(*shape, scale=1.0, seed=0, dtype=F64):
    return (torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _req(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# --- against the references ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", [1.0, 3.0, 0.25])
def test_channel_wise_matches_reference(shape, t):
    ys, yt = _rand(*shape, scale=2, seed=1), _rand(*shape, scale=2, seed=2)
    assert_matches_reference(lambda s, y: ops.channel_wise_loss(s, y, t), lambda s, y: ref.channel_wise_loss(s, y, t),
                             [ys, yt], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("radius, patch", WINDOWS)
def test_pairwise_local_matches_reference(shape, radius, patch):
    b, c, h, w = shape
    fs, ft = _rand(b, c, h, w, seed=3), _rand(b, c + 2, h, w, seed=4)
    assert_matches_reference(lambda s, y: ops.pairwise_local_loss(s, y, radius, patch),
                             lambda s, y: ref.pairwise_local_loss(s, y, radius, patch), [fs, ft], rtol=1e-9, atol=1e-12)


def test_channel_wise_long_planes_and_extreme_logits():
    """Planes of several online-softmax blocks, a maximum that grows late, and large logits."""
    ys, yt = _rand(2, 3, 47, 61, scale=8, seed=5), _rand(2, 3, 47, 61, scale=8, seed=6)
    yt[:, :, -1, -1] = 200.0  # the teacher's maximum sits in the last block
    ys[0, 0] = -1e4
    assert_matches_reference(lambda s, y: ops.channel_wise_loss(s, y, 2.0), lambda s, y: ref.channel_wise_loss(s, y, 2.0),
                             [ys, yt], rtol=1e-9, atol=1e-10)


def test_pairwise_local_window_covering_the_grid_is_the_full_graph():
    fs, ft = _rand(2, 3, 7, 5, seed=7), _rand(2, 2, 7, 5, seed=8)
    for patch in (1, 2):
        hp = -(-7 // patch)
        torch.testing.assert_close(ops.pairwise_local_loss(fs, ft, hp - 1, patch), ops.pairwise_affinity_loss(fs, ft, patch),
                                   rtol=1e-10, atol=1e-12)
    assert ops.pairwise_local_loss(fs, ft, 2**62, 1).isfinite()  # a huge radius neither overflows nor hangs
    # A patch beyond the map: one node of the whole image, like patch = max(H, W).
    torch.testing.assert_close(ops.pairwise_local_loss(fs, ft, 1, 2**62), ops.pairwise_local_loss(fs, ft, 1, 7))


def test_zero_nodes_and_identical_inputs():
    f = _rand(1, 3, 4, 4, seed=9)
    assert ops.pairwise_local_loss(f, f.clone(), 1).item() == 0.0
    assert abs(ops.channel_wise_loss(f, f.clone(), 3.0).item()) < 1e-14
    z = torch.zeros(1, 2, 3, 3, dtype=F64)
    z[0, 0, 0, 0] = 1.0  # one non-zero node among zero nodes: a_ii = 1 for it only
    assert_matches_reference(lambda s, y: ops.pairwise_local_loss(s, y, 1), lambda s, y: ref.pairwise_local_loss(s, y, 1),
                             [z, _rand(1, 2, 3, 3, seed=10)], rtol=1e-10, atol=1e-12)


def test_empty_batch_or_map_gives_zero():
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4)):
        fs, ft = _req(torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64))
        loss = ops.pairwise_local_loss(fs, ft, 1)
        loss.backward()
        assert loss.item() == 0.0 and fs.grad.shape == fs.shape


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    ys, yt = _rand(2, 5, 6, 7, seed=11), _rand(2, 5, 6, 7, seed=12)
    for fused, reference in ((lambda s, y: ops.channel_wise_loss(s, y, 1.5), lambda s, y: ref.channel_wise_loss(s, y, 1.5)),
                             (lambda s, y: ops.pairwise_local_loss(s, y, 1, 2), lambda s, y: ref.pairwise_local_loss(s, y, 1, 2))):
        assert_matches_reference(fused, reference, [as_layout(ys, layout), yt], rtol=1e-9, atol=1e-12)
        assert_matches_reference(fused, reference, [ys, as_layout(yt, layout)], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_against_float64(dtype, tol):
    ys, yt = _rand(2, 4, 9, 8, seed=13, dtype=dtype), _rand(2, 4, 9, 8, seed=14, dtype=dtype)
    for fused, reference in ((lambda s, y: ops.channel_wise_loss(s, y, 2.0), lambda s, y: ref.channel_wise_loss(s, y, 2.0)),
                             (lambda s, y: ops.pairwise_local_loss(s, y, 1), lambda s, y: ref.pairwise_local_loss(s, y, 1))):
        out = fused(ys, yt)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), reference(ys.double(), yt.double()), rtol=tol, atol=tol)


def test_device_generic_paths_match_the_references():
    """What the ops run on CUDA (no kernel there), checked here on CPU tensors."""
    fs, ft = _rand(2, 3, 9, 7, seed=15), _rand(2, 5, 9, 7, seed=16)
    for radius, patch in WINDOWS:
        torch.testing.assert_close(_pairwise_local_generic(fs, ft, radius, patch), ref.pairwise_local_loss(fs, ft, radius, patch),
                                   rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_channel_wise_generic(fs, fs.flip(1), 3.0), ref.channel_wise_loss(fs, fs.flip(1), 3.0))


# --- autograd, opcheck, compile ---------------------------------------------------------------------

def _cases():
    ys, yt = _req(_rand(2, 3, 5, 7, seed=17), _rand(2, 3, 5, 7, seed=18))
    cl = _req(_rand(1, 4, 3, 5, seed=19).to(memory_format=torch.channels_last), _rand(1, 4, 3, 5, seed=20))
    fs, ft = _req(_rand(2, 3, 5, 7, seed=21), _rand(2, 2, 5, 7, seed=22))
    return [
        ("channel_wise", P.channel_wise_loss.default, lambda a, b, t: ops.channel_wise_loss(a, b, t), [ys, yt, 1.7]),
        ("channel_wise_cl", P.channel_wise_loss.default, lambda a, b, t: ops.channel_wise_loss(a, b, t), [*cl, 3.0]),
        ("local_r1_p1", P.pairwise_local_loss.default, ops.pairwise_local_loss, [fs, ft, 1, 1]),
        ("local_r1_p2", P.pairwise_local_loss.default, ops.pairwise_local_loss, [fs, ft, 1, 2]),
        ("local_r0_p3", P.pairwise_local_loss.default, ops.pairwise_local_loss, [fs, ft, 0, 3]),
    ]


CASES = _cases()


test_gradcheck, test_opcheck = conformance_tests(CASES)


def test_opcheck_backward_ops():
    ys, yt = _rand(2, 3, 4, 5, seed=23), _rand(2, 3, 4, 5, seed=24)
    _, stats = P.channel_wise_loss(ys, yt, 2.0)
    torch.library.opcheck(P.channel_wise_loss_backward.default, (torch.tensor(0.5, dtype=F64), ys, yt, stats, 2.0))
    torch.library.opcheck(P.pairwise_local_loss_backward.default, (torch.tensor(0.5, dtype=F64), ys, yt, 1, 2))


def test_the_forward_keeps_no_softmax():
    """What channel_wise_loss saves for the backward: the inputs and (B, C, 3) float64 stats."""
    ys, yt = _req(_rand(2, 3, 8, 8, seed=25), _rand(2, 3, 8, 8, seed=26))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ops.channel_wise_loss(ys, yt, 2.0)
    assert sorted(saved) == sorted([(2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 3)])


def _both(ys, yt, fs, ft):
    return ops.channel_wise_loss(ys, yt, 3.0) + 0.5 * ops.pairwise_local_loss(fs, ft, 1, 2)


def _both_reference(ys, yt, fs, ft):
    return ref.channel_wise_loss(ys, yt, 3.0) + 0.5 * ref.pairwise_local_loss(fs, ft, 1, 2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    args = (torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5), torch.randn(2, 3, 7, 9), torch.randn(2, 5, 7, 9))
    assert_compiled_matches(_both, _both_reference, args, backend)


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, err, pattern", [
    (lambda: ops.channel_wise_loss(_rand(2, 3, 3), _rand(2, 3, 3)), ValueError, r"ys must have 4 dimensions"),
    (lambda: ops.channel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 4)), ValueError, r"yt must have shape \(2, 3, 3, 3\)"),
    (lambda: ops.channel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3).float()), ValueError, r"yt must have the same dtype"),
    (lambda: ops.channel_wise_loss(torch.ones(2, 3, 3, 3, dtype=torch.long), _rand(2, 3, 3, 3)), TypeError, r"ys must be a floating"),
    (lambda: ops.channel_wise_loss(_rand(2, 0, 3, 3), _rand(2, 0, 3, 3)), ValueError, r"ys must have at least one channel"),
    (lambda: ops.channel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), 0.0), ValueError, r"temperature must be a finite number > 0"),
    (lambda: ops.channel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), float("inf")), ValueError, r"temperature must be a finite"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3), _rand(2, 3, 3, 3), 1), ValueError, r"fs must have 4 dimensions"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3, 3), _rand(1, 3, 3, 3), 1), ValueError, r"fs and ft must have the same batch"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), -1), ValueError, r"radius must be >= 0"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), True), TypeError, r"radius must be an int"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), 1, 0), ValueError, r"patch must be >= 1"),
    (lambda: ops.pairwise_local_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3).half(), 1), ValueError, r"ft must have the same dtype"),
])
def test_python_api_bad_input_names_the_argument(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()


CW, CWB = "channel_wise_loss: ", "channel_wise_loss_backward: "
PL, PLB = "pairwise_local_loss: ", "pairwise_local_loss_backward: "
PRELUDE = """
import torch
import pyamalgam.ops
P = torch.ops.pyamalgam
def r(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)
def g0():
    return torch.tensor(1.0, dtype=torch.float64)
def st(*shape):
    return torch.zeros(*shape, dtype=torch.float64)
"""
# (id, expression, regex; None: valid). The backward cases with wrong shapes are the ones that would
# read out of bounds without the C++ checks.
DIRECT = [
    ("cw_valid", "P.channel_wise_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), 2.0)", None),
    ("cw_yt_small", "P.channel_wise_loss(r(2, 3, 400, 500), r(1, 3, 4, 5), 2.0)",
     CW + r"yt must have the shape of ys \(2, 3, 400, 500\), got \(1, 3, 4, 5\)"),
    ("cw_ys_3d", "P.channel_wise_loss(r(3, 4, 5), r(3, 4, 5), 2.0)", CW + r"ys must have 4 dimensions, got shape \(3, 4, 5\)"),
    ("cw_ys_int", "P.channel_wise_loss(torch.ones(2, 3, 4, 5, dtype=torch.int64), r(2, 3, 4, 5), 2.0)",
     CW + r"ys must be a floating-point tensor \(float16, bfloat16, float32 or float64\), got torch.int64"),
    ("cw_no_pixel", "P.channel_wise_loss(r(2, 3, 0, 5), r(2, 3, 0, 5), 2.0)", CW + r"ys must have at least one channel and one pixel"),
    ("cw_yt_dtype", "P.channel_wise_loss(r(2, 3, 4, 5), r(2, 3, 4, 5, dtype=torch.float32), 2.0)",
     CW + r"yt must have the same dtype as ys \(torch.float64\), got torch.float32"),
    ("cw_temperature", "P.channel_wise_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), -1.5)", CW + r"temperature must be a finite number > 0, got -1.5"),
    ("cw_temperature_nan", "P.channel_wise_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), float('nan'))", CW + r"temperature must be a finite number > 0, got nan"),
    ("cwb_valid", "P.channel_wise_loss_backward(g0(), r(2, 3, 4, 5), r(2, 3, 4, 5), st(2, 3, 3), 2.0)", None),
    ("cwb_stats_small", "P.channel_wise_loss_backward(g0(), r(2, 300, 40, 50), r(2, 300, 40, 50), st(1, 3), 2.0)",
     CWB + r"stats must have shape \(2, 300, 3\) \(\(B, C, 3\) of ys\), got \(1, 3\)"),
    ("cwb_stats_float", "P.channel_wise_loss_backward(g0(), r(2, 3, 4, 5), r(2, 3, 4, 5), st(2, 3, 3).float(), 2.0)",
     CWB + r"stats must be a float64 tensor \(the forward's\), got torch.float32"),
    ("cwb_grad_shape", "P.channel_wise_loss_backward(torch.ones(2), r(2, 3, 4, 5), r(2, 3, 4, 5), st(2, 3, 3), 2.0)",
     CWB + r"grad must have one element \(the loss is a scalar\), got shape \(2,\)"),
    ("cwb_grad_empty", "P.channel_wise_loss_backward(torch.ones(0), r(2, 3, 4, 5), r(2, 3, 4, 5), st(2, 3, 3), 2.0)",
     CWB + r"grad must have one element"),
    ("pl_valid", "P.pairwise_local_loss(r(2, 3, 4, 5), r(2, 6, 4, 5), 1, 2)", None),
    ("pl_ft_small", "P.pairwise_local_loss(r(2, 3, 400, 500), r(2, 3, 4, 5), 1, 1)",
     PL + r"fs and ft must have the same batch and spatial sizes \(channels may differ\): fs is \(2, 3, 400, 500\), ft is \(2, 3, 4, 5\)"),
    ("pl_ft_3d", "P.pairwise_local_loss(r(2, 3, 4, 5), r(3, 4, 5), 1, 1)", PL + r"ft must have 4 dimensions, got shape \(3, 4, 5\)"),
    ("pl_radius", "P.pairwise_local_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), -1, 1)", PL + r"radius must be >= 0, got -1"),
    ("pl_patch", "P.pairwise_local_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), 1, 0)", PL + r"patch must be >= 1, got 0"),
    ("pl_ft_dtype", "P.pairwise_local_loss(r(2, 3, 4, 5), r(2, 3, 4, 5, dtype=torch.float16), 1, 1)",
     PL + r"ft must have the same dtype as fs \(torch.float64\), got torch.float16"),
    ("plb_valid", "P.pairwise_local_loss_backward(g0(), r(2, 3, 4, 5), r(2, 6, 4, 5), 1, 2)", None),
    ("plb_grad_shape", "P.pairwise_local_loss_backward(r(2, 3), r(2, 3, 4, 5), r(2, 3, 4, 5), 1, 1)",
     PLB + r"grad must have one element \(the loss is a scalar\), got shape \(2, 3\)"),
    ("plb_ft_small", "P.pairwise_local_loss_backward(g0(), r(2, 3, 40, 50), r(1, 3, 4, 5), 1, 1)",
     PLB + r"fs and ft must have the same batch and spatial sizes"),
]
CHILD = PRELUDE + """
import json, sys
for cid, expr in json.loads(sys.stdin.read()):
    print(json.dumps({"id": cid, "start": True}), flush=True)
    try:
        eval(expr)
        rec = {"id": cid, "type": None}
    except Exception as e:
        rec = {"id": cid, "type": type(e).__name__, "message": str(e).splitlines()[0]}
    print(json.dumps(rec), flush=True)
"""


@pytest.fixture(scope="module")
def direct_results():
    """All cases in one child process; a crash fails the case that was running (and those after it)."""
    out = subprocess.run([sys.executable, "-P", "-c", CHILD], input=json.dumps([(c, e) for c, e, _ in DIRECT]),
                         capture_output=True, text=True, timeout=600, env=subprocess_env())
    results = {}
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        results[rec["id"]] = {"crash": f"exit {out.returncode}: {out.stderr[-2000:]}"} if rec.pop("start", False) else rec
    return results


@pytest.mark.parametrize("case", DIRECT, ids=[c[0] for c in DIRECT])
def test_direct_call_raises_a_clean_runtime_error(direct_results, case):
    cid, expr, pattern = case
    got = direct_results.get(cid, {"crash": "never ran (an earlier case killed the process)"})
    assert "crash" not in got, f"{expr}: {got['crash']}"
    if pattern is None:
        assert got["type"] is None, f"{expr} (valid) raised {got['type']}: {got.get('message')}"
        return
    assert got["type"] == "RuntimeError", f"{expr} raised {got['type']}: {got.get('message')}"
    assert __import__("re").search(pattern, got["message"]), f"{got['message']!r} !~ {pattern!r}"


@pytest.mark.parametrize("case", DIRECT, ids=[c[0] for c in DIRECT])
def test_fake_kernels_refuse_with_the_same_message(direct_results, case):
    cid, expr, pattern = case
    ns = {}
    exec(PRELUDE, ns)  # noqa: S102
    with FakeTensorMode():
        if pattern is None:
            eval(expr, ns)
            return
        with pytest.raises(RuntimeError, match=pattern) as err:
            eval(expr, ns)
    assert str(err.value).splitlines()[0] == direct_results[cid]["message"]


# --- memory of the local op ---------------------------------------------------------------------------

def _peak_and_largest(fn):
    """(peak bytes above the start, largest single allocation) of the CPU allocator during fn(),
    from the profiler's allocation events (each carries the allocator's running total)."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    assert allocs, "the profiler recorded no allocation"
    start = allocs[0].extra_fields.total_allocated - allocs[0].extra_fields.alloc_size
    peak = max(e.extra_fields.total_allocated for e in allocs) - start
    return peak, max(e.extra_fields.alloc_size for e in allocs)


def _unfold_local(fs, ft, radius):
    """The naive local loss: gather each node's (2r+1)^2 neighbours (N alpha C values per map)."""
    k = 2 * radius + 1

    def affinities(f):
        n = ref.normalize_nodes(ref.pool_nodes(f, 1)).transpose(1, 2).reshape(f.shape)
        neigh = torch.nn.functional.unfold(n, k, padding=radius).reshape(f.shape[0], f.shape[1], k * k, -1)
        return (n.flatten(2)[:, :, None] * neigh).sum(1)

    return ((affinities(fs) - affinities(ft)) ** 2).mean()


def test_local_op_memory_does_not_grow_with_alpha():
    b, c, h, w = 1, 32, 24, 24
    fs, ft = _req(torch.randn(b, c, h, w), torch.randn(b, c, h, w))
    nodes_bytes = b * c * h * w * 8  # one map's float64 nodes

    def run(fn, radius):
        def step():
            fn(fs, ft, radius).backward()
        return _peak_and_largest(step)

    fused = {r: run(ops.pairwise_local_loss, r) for r in (1, 5)}
    unfold = {r: run(_unfold_local, r) for r in (1, 5)}
    alpha = 11 * 11
    # The fused op: the same peak for alpha = 9 and 121 (node rows and their gradients, O(N C)),
    # and no allocation anywhere near one N alpha C gather.
    assert fused[5][0] <= 1.2 * fused[1][0] + 4096, fused
    assert fused[5][1] <= 2 * nodes_bytes < b * c * h * w * alpha * 4, fused
    # The unfold's peak grows with alpha, as the test must be able to see.
    assert unfold[5][0] > 5 * unfold[1][0] and unfold[5][1] >= b * c * h * w * alpha * 4, unfold

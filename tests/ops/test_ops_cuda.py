"""The op checks on CUDA: values and gradients against the float64 reference, dtypes, layouts,
gradcheck, opcheck, torch.compile, CUDA-graph capture, determinism and CUDA/CPU agreement.

Skipped as a whole without a CUDA device or without CUDA kernels in this build.
"""
import pytest
import torch
from _cases import (
    SHAPES,
    as_layout,
    assert_matches_reference,
    assert_pairwise_matches_reference,
    channel_coding_args,
    depth_args,
)

import pyamalgam
from pyamalgam import ops
from pyamalgam.ops import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not pyamalgam.build_info()["with_cuda"], reason="this pyamalgam build has no CUDA kernels"),
]

DEV = "cuda"
P = torch.ops.pyamalgam

# SHAPES plus shapes that reach the vectorised paths, several pixel chunks per plane and odd sizes.
CUDA_SHAPES = SHAPES + [(2, 64, 30, 40), (3, 5, 17, 19), (1, 1, 64, 64), (2, 24, 33, 1)]


def cuda(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


# ---------------------------------------------------------------------------------------------
# float64 against the reference


@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_channel_coding(shape):
    assert_matches_reference(ops.channel_coding, ref.channel_coding, cuda(*channel_coding_args(*shape)))


@pytest.mark.parametrize("reduction", [1, 4, 16])
def test_channel_coding_hidden_sizes(reduction):
    args = cuda(*channel_coding_args(3, 48, 9, 11, reduction=reduction))
    assert_matches_reference(ops.channel_coding, ref.channel_coding, args)


@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("bins", [1, 2, 17, 64, 300])  # 300 float64 bins: the uncached backward
def test_soft_argmax_depth(shape, bins):
    b, _, h, w = shape
    logits = torch.randn(b, bins, h, w, dtype=torch.float64, device=DEV) * 3
    out = assert_matches_reference(
        lambda l: ops.soft_argmax_depth(l, 0.25), lambda l: ref.soft_argmax_depth(l, 0.25), [logits]
    )
    assert out.shape == (b, h, w)


def test_soft_argmax_depth_is_stable_for_huge_logits():
    logits = torch.tensor([1000.0, 0.0, -1000.0], dtype=torch.float32, device=DEV).view(1, 3, 1, 1)
    assert ops.soft_argmax_depth(logits, 2.0).item() == pytest.approx(2.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_soft_argmax_depth_non_finite_logits(layout):
    """-inf bins drop out; a pixel of only -inf, an inf or a NaN gives NaN (like CPU and the reference)."""
    inf, nan = float("inf"), float("nan")
    rows = [
        [-inf, 0.0, 1.0, -inf],  # finite
        [-inf, -inf, -inf, -inf],  # NaN
        [0.0, inf, 1.0, 2.0],  # NaN
        [0.0, nan, 1.0, 2.0],  # NaN
    ]
    logits = torch.tensor(rows, dtype=torch.float32).t().reshape(1, 4, 2, 2)
    cpu = ops.soft_argmax_depth(as_layout(logits, layout), 0.5)
    got = ops.soft_argmax_depth(as_layout(logits.to(DEV), layout), 0.5).cpu()
    want = ref.soft_argmax_depth(logits.double(), 0.5).float()
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(got, cpu, equal_nan=True)
    assert torch.isfinite(got.flatten()[0]) and torch.isnan(got.flatten()[1:]).all()


@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_si_depth_loss(shape, masked):
    b, _, h, w = shape
    pred, target, mask = cuda(*depth_args(b, h, w))
    args = [pred, target, mask] if masked else [pred, target]
    assert_matches_reference(ops.si_depth_loss, ref.si_depth_loss, args)


def test_si_depth_loss_accepts_a_channel_dimension():
    pred, target, mask = cuda(*depth_args(2, 5, 6))
    flat = ops.si_depth_loss(pred, target, mask)
    torch.testing.assert_close(ops.si_depth_loss(pred[:, None], target[:, None], mask[:, None]), flat)


def test_si_depth_loss_all_invalid_gives_zero_and_zero_gradients():
    pred, target, _ = cuda(*depth_args(3, 7, 5))
    pred.requires_grad_()
    target.requires_grad_()
    mask = torch.zeros(3, 7, 5, dtype=torch.bool, device=DEV)
    loss = ops.si_depth_loss(pred, target, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred)) and torch.equal(target.grad, torch.zeros_like(target))


def test_si_depth_loss_nan_handling():
    pred, target, mask = cuda(*depth_args(2, 6, 9))
    pred = pred.clone()
    pred[0, 0, 0] = float("nan")
    mask[0, 0, 0] = False
    # Masked out: ignored entirely, value and gradients finite.
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    loss = ops.si_depth_loss(p, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all() and torch.isfinite(t.grad).all()
    torch.testing.assert_close(loss.double(), ref.si_depth_loss(pred.double(), target.double(), mask))
    # Valid: propagates.
    mask[0, 0, 0] = True
    assert torch.isnan(ops.si_depth_loss(pred, target, mask))
    assert torch.isnan(ops.si_depth_loss(pred, target))


@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (2, 3, 7, 9), (2, 16, 12, 10)])
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_pairwise_affinity_loss(shape, patch):
    assert_pairwise_matches_reference(shape, patch, DEV)


def test_pairwise_affinity_loss_at_32000_nodes():
    """N = 160 x 200 = 32000 nodes: runs in linear memory on CUDA and agrees with the CPU op."""
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 16, 160, 200, generator=g)
    ft = torch.randn(2, 24, 160, 200, generator=g)
    s, t = fs.to(DEV).requires_grad_(), ft.to(DEV).requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    loss = ops.pairwise_affinity_loss(s, t, 1)
    loss.backward()
    torch.cuda.synchronize()
    # Linear in N: far below one N x N float32 matrix (4 GB).
    assert torch.cuda.max_memory_allocated() < 1 << 30
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    cpu = ops.pairwise_affinity_loss(fs, ft, 1)
    torch.testing.assert_close(loss.cpu(), cpu, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# Layouts and dtypes

LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (2, 64, 30, 40), (3, 12, 9, 13)])
def test_layouts_give_the_same_result(layout, shape):
    b, c, h, w = shape
    x, *wts = cuda(*channel_coding_args(b, c, h, w))
    xl = as_layout(x, layout)
    y = ops.channel_coding(xl, *wts)
    torch.testing.assert_close(y, ref.channel_coding(x, *wts))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(ops.channel_coding, ref.channel_coding, [xl, *wts])
    for bins in (6, 64):
        logits = torch.randn(b, bins, h, w, dtype=torch.float64, device=DEV)
        assert_matches_reference(
            lambda l: ops.soft_argmax_depth(l, 0.5), lambda l: ref.soft_argmax_depth(l, 0.5), [as_layout(logits, layout)]
        )
    fs = torch.randn(b, 4, h, w, dtype=torch.float64, device=DEV)
    ft = torch.randn(b, 3, h, w, dtype=torch.float64, device=DEV)
    assert_matches_reference(
        lambda s, t: ops.pairwise_affinity_loss(s, t, 2),
        lambda s, t: ref.pairwise_affinity_loss(s, t, 2),
        [as_layout(fs, layout), as_layout(ft, layout)],
        rtol=1e-9,
    )
    pred, target, mask = cuda(*depth_args(b, h, w))
    torch.testing.assert_close(
        ops.si_depth_loss(as_layout(pred[:, None], layout), as_layout(target[:, None], layout), mask[:, None]),
        ref.si_depth_loss(pred, target, mask),
    )


def test_backward_layouts_match_the_fake_kernels():
    """Gradient strides follow dense_format, as the fake kernels promise."""
    x, *wts = cuda(*channel_coding_args(2, 8, 5, 6))
    x = x.to(memory_format=torch.channels_last)
    gx, *_ = P.channel_coding_backward.default(torch.randn_like(x), x, *wts)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    logits = torch.randn(2, 8, 5, 6, dtype=torch.float64, device=DEV).to(memory_format=torch.channels_last)
    gl = P.soft_argmax_depth_backward.default(torch.randn(2, 5, 6, dtype=torch.float64, device=DEV), logits, 0.5)
    assert gl.is_contiguous(memory_format=torch.channels_last)


TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_inputs_accumulate_in_fp32_or_better(dtype, layout):
    tol = TOL[dtype]
    for shape in [(2, 8, 9, 7), (2, 64, 30, 40)]:
        x, *w = cuda(*channel_coding_args(*shape, dtype=dtype))
        y = ops.channel_coding(as_layout(x, layout), *w)
        assert y.dtype == dtype
        want = ref.channel_coding(x.double(), *[t.double() for t in w])
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        # Gradients too: grad_x against the float64 reference.
        xs = as_layout(x, layout).detach().requires_grad_()
        ops.channel_coding(xs, *w).backward(torch.ones(shape, dtype=dtype, device=DEV))
        xd = x.double().requires_grad_()
        ref.channel_coding(xd, *[t.double() for t in w]).sum().backward()
        torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=tol * 4, atol=tol * 4)
    for bins in (32, 64):
        logits = (torch.randn(2, bins, 9, 8, device=DEV) * 4).to(dtype)
        d = ops.soft_argmax_depth(as_layout(logits, layout), 0.1)
        assert d.dtype == dtype
        torch.testing.assert_close(d.double(), ref.soft_argmax_depth(logits.double(), 0.1), rtol=tol, atol=tol * 3)
    # A large image in float32 would drift with plain float32 sums.
    pred, target, mask = cuda(*depth_args(1, 300, 400, dtype=dtype))
    loss = ops.si_depth_loss(pred, target, mask)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.si_depth_loss(pred.double(), target.double(), mask), rtol=tol, atol=0)
    fs, ft = (torch.randn(2, 8, 9, 7, device=DEV).to(dtype) for _ in range(2))
    pw = ops.pairwise_affinity_loss(fs, ft, 2)
    pw_tol = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]  # the result's own rounding
    torch.testing.assert_close(pw.double(), ref.pairwise_affinity_loss(fs.double(), ft.double(), 2), rtol=pw_tol, atol=0)


# ---------------------------------------------------------------------------------------------
# CUDA against CPU, determinism, streams, devices


def _all_forward_backward(device, dtype, layout="contiguous", seed=0, pairwise=True):
    """Outputs and gradients of every op for fixed inputs (generated on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    x, w1, b1, w2, b2 = channel_coding_args(2, 32, 13, 20, dtype=dtype, gen=g)
    logits = torch.randn(2, 24, 13, 20, generator=g, dtype=dtype) * 3
    pred, target, mask = depth_args(2, 13, 20, dtype=dtype, gen=g)
    fs = torch.randn(2, 6, 13, 20, generator=g, dtype=dtype)
    ft = torch.randn(2, 5, 13, 20, generator=g, dtype=dtype)
    ins = [t.to(device) for t in (x, w1, b1, w2, b2, logits, pred, target, fs, ft)]
    ins[0], ins[5] = as_layout(ins[0], layout), as_layout(ins[5], layout)
    ins = [t.detach().requires_grad_() for t in ins]
    x, w1, b1, w2, b2, logits, pred, target, fs, ft = ins
    outs = [
        ops.channel_coding(x, w1, b1, w2, b2),
        ops.soft_argmax_depth(logits, 0.3),
        ops.si_depth_loss(pred, target, mask.to(device)),
        ops.si_depth_loss(pred, target),
    ]
    if pairwise:
        outs.append(ops.pairwise_affinity_loss(fs, ft, 2))
    grads = []
    for o in outs:
        gr = torch.autograd.grad(o, ins, torch.ones_like(o), allow_unused=True)
        grads += [t for t in gr if t is not None]
    return [o.detach().cpu() for o in outs] + [t.cpu() for t in grads]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_agrees_with_cpu(dtype, layout):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    for got, want in zip(_all_forward_backward(DEV, dtype, layout), _all_forward_backward("cpu", dtype, layout)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(dtype):
    """The reductions have a fixed order and no atomics: two runs are bit-identical."""
    for layout in ("contiguous", "channels_last"):
        a = _all_forward_backward(DEV, dtype, layout, seed=3, pairwise=False)
        b = _all_forward_backward(DEV, dtype, layout, seed=3, pairwise=False)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_runs_on_the_current_stream():
    """Inputs produced on a delayed side stream: a kernel launched on any other stream would read
    them before they exist."""
    x, *w = cuda(*channel_coding_args(4, 64, 40, 30, dtype=torch.float32))
    logits = torch.randn(4, 64, 40, 30, device=DEV)
    pred, target, mask = cuda(*depth_args(4, 40, 30, dtype=torch.float32))
    fns = [
        lambda x, l, p: ops.channel_coding(x, *w),
        lambda x, l, p: ops.soft_argmax_depth(l, 0.5),
        lambda x, l, p: ops.si_depth_loss(p, target, mask),
    ]
    want = [f(x, logits, pred) for f in fns]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        x2, l2, p2 = x * 1, logits * 1, pred * 1
        got = [f(x2, l2, p2) for f in fns]
    s.synchronize()
    for u, v in zip(got, want):
        assert torch.equal(u, v)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on the inputs' device."""
    with torch.cuda.device(0):
        got = _all_forward_backward("cuda:1", torch.float64)
    for u, v in zip(got, _all_forward_backward("cpu", torch.float64)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_no_host_synchronisation():
    """Forward and backward kernels never synchronise with the host (no .item(), no D2H copy)."""
    x, *w = cuda(*channel_coding_args(2, 16, 9, 10, dtype=torch.float32))
    logits = torch.randn(2, 16, 9, 10, device=DEV)
    pred, target, mask = cuda(*depth_args(2, 9, 10, dtype=torch.float32))
    grad0 = torch.ones((), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = P.channel_coding.default(x, *w)
        P.channel_coding_backward.default(torch.ones_like(y), x, *w)
        d = P.soft_argmax_depth.default(logits, 0.5)
        P.soft_argmax_depth_backward.default(torch.ones_like(d), logits, 0.5)
        P.si_depth_loss.default(pred, target, mask)
        P.si_depth_loss_backward.default(grad0, pred, target, mask)
        P.si_depth_loss_backward.default(grad0, pred, target, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, CUDA graphs


def _req(*ts):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def cases():
    """(name, op overload, python api, args for the op) in float64 on CUDA, small and awkward."""
    cc = _req(*cuda(*channel_coding_args(2, 3, 5, 3)))
    cc_cl = _req(*cuda(*channel_coding_args(1, 4, 3, 5)))
    cc_cl[0] = cc_cl[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    cc_vec = _req(*cuda(*channel_coding_args(2, 8, 4, 4)))
    logits = _req(torch.randn(2, 5, 3, 7, dtype=torch.float64, device=DEV))[0]
    logits_cl = _req(torch.randn(2, 6, 3, 4, dtype=torch.float64, device=DEV).to(memory_format=torch.channels_last))[0]
    pred, target, mask = cuda(*depth_args(2, 4, 5))
    pred, target = _req(pred, target)
    fs, ft = _req(
        torch.randn(2, 3, 5, 7, dtype=torch.float64, device=DEV), torch.randn(2, 2, 5, 7, dtype=torch.float64, device=DEV)
    )
    return [
        ("channel_coding", P.channel_coding.default, ops.channel_coding, cc),
        ("channel_coding_cl", P.channel_coding.default, ops.channel_coding, cc_cl),
        ("channel_coding_vec", P.channel_coding.default, ops.channel_coding, cc_vec),
        ("soft_argmax_depth", P.soft_argmax_depth.default, ops.soft_argmax_depth, [logits, 0.3]),
        ("soft_argmax_depth_cl", P.soft_argmax_depth.default, ops.soft_argmax_depth, [logits_cl, 0.3]),
        ("si_depth_loss", P.si_depth_loss.default, ops.si_depth_loss, [pred, target, mask]),
        ("si_depth_loss_nomask", P.si_depth_loss.default, ops.si_depth_loss, [pred, target, None]),
        ("pairwise_p1", P.pairwise_affinity_loss.default, ops.pairwise_affinity_loss, [fs, ft, 1]),
        ("pairwise_p3", P.pairwise_affinity_loss.default, ops.pairwise_affinity_loss, [fs, ft, 3]),
        # The API's overload: the forward returns what the saved backward needs (ATen path on CUDA).
        ("pairwise_saving_p2", P.pairwise_affinity_loss_for_backward.default, ops.pairwise_affinity_loss, [fs, ft, 2]),
    ]


@pytest.fixture(scope="module")
def op_cases():
    return {c[0]: c for c in cases()}


CASE_NAMES = [
    "channel_coding",
    "channel_coding_cl",
    "channel_coding_vec",
    "soft_argmax_depth",
    "soft_argmax_depth_cl",
    "si_depth_loss",
    "si_depth_loss_nomask",
    "pairwise_p1",
    "pairwise_p3",
    "pairwise_saving_p2",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradcheck(op_cases, name):
    _, _, api, args = op_cases[name]
    assert torch.autograd.gradcheck(lambda *a: api(*a), args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(op_cases, name):
    _, op, _, args = op_cases[name]
    torch.library.opcheck(op, args)


def _make_all_ops(api, pairwise=True):
    def all_ops(x, w1, b1, w2, b2, logits, pred, target, mask, fs):
        y = api.channel_coding(x, w1, b1, w2, b2)
        d = api.soft_argmax_depth(logits, 0.5)
        out = y.square().mean() + d.mean() + api.si_depth_loss(d, target, mask) + api.si_depth_loss(pred, target)
        if pairwise:
            out = out + api.pairwise_affinity_loss(fs, y, 2)
        else:
            out = out + fs.sum() * 0
        return out

    return all_ops


_all_ops = _make_all_ops(ops)
_all_ops_reference = _make_all_ops(ref)
# The pair-wise op's CUDA path (the ATen composite) uses torch.linalg.svd, which synchronises with
# the host to check its result: it cannot be captured in a CUDA graph, so graph tests leave it out.
_graph_ops = _make_all_ops(ops, pairwise=False)
_graph_ops_reference = _make_all_ops(ref, pairwise=False)


def _compile_args(layout="contiguous"):
    x, w1, b1, w2, b2 = cuda(*channel_coding_args(2, 8, 6, 8, dtype=torch.float32))
    logits = torch.randn(2, 8, 6, 8, device=DEV)
    pred, target, mask = cuda(*depth_args(2, 6, 8, dtype=torch.float32))
    fs = torch.randn(2, 3, 6, 8, device=DEV)
    x, logits = as_layout(x, layout), as_layout(logits, layout)
    return _req(x, w1, b1, w2, b2, logits, pred, target) + [mask, fs.requires_grad_()]


def _check_against_reference(out, args, reference=_all_ops_reference):
    got = [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    expected = reference(*ref_args)
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for g, a in zip(got, [a for a in ref_args if a.requires_grad]):
        torch.testing.assert_close(g, a.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_matches_eager(backend, layout):
    torch._dynamo.reset()
    args = _compile_args(layout)
    compiled = torch.compile(_all_ops, fullgraph=True, backend=backend)
    out = compiled(*args)
    out.backward()
    _check_against_reference(out, args)


def test_compile_with_cuda_graphs():
    """inductor's "reduce-overhead" mode records the compiled forward and backward in CUDA graphs."""
    torch._dynamo.reset()
    compiled = torch.compile(_graph_ops, fullgraph=True, mode="reduce-overhead")
    for _ in range(4):  # warm-up runs, then replays of the recorded graphs
        args = _compile_args()
        out = compiled(*args)
        out.backward()
        out = out.detach().clone()
    _check_against_reference(out, args, _graph_ops_reference)


def test_cuda_graph_capture_forward_backward():
    """Forward and backward of the fused kernels captured in one CUDA graph, replayed on new inputs
    (capture fails on any host synchronisation)."""
    static = _compile_args()
    leaves = [a for a in static if a.requires_grad]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (allocator, autograd) outside the capture
        for _ in range(2):
            for a in leaves:
                a.grad = None
            _graph_ops(*static).backward()
    torch.cuda.current_stream().wait_stream(s)
    for a in leaves:
        a.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _graph_ops(*static)
        static_out.backward()
    for seed in (5, 6):
        torch.manual_seed(seed)
        fresh = _compile_args()
        with torch.no_grad():
            for a, f in zip(static, fresh):
                a.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        for a, f in zip(leaves, [f for f in fresh if f.requires_grad]):
            f.grad = a.grad.clone()
        _check_against_reference(static_out.detach().clone(), fresh, _graph_ops_reference)

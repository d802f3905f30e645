"""Edge cases of the fused operators (docs/robustness.md, "Empty and extreme inputs").

* arguments that used to give NaN or crash: ``soft_argmax_depth`` with 0 bins (now refused, with
  the same message from the Python API, the C++ check and the fake kernel), a ``patch`` of
  2**63 - 1 (one node per image, as any patch >= max(H, W), instead of NaN from an overflowing
  size computation), ``si_depth_loss`` whose float64 value overflows the dtype (inf, the float64
  value rounded to the dtype, instead of a conversion error);
* empty inputs (B = 0, H = 0, W = 0) of every op, forward and backward, through the Python API,
  the direct ``torch.ops.pyamalgam`` overloads, the reference, the fake kernels and
  ``torch.compile(fullgraph=True)``: map-valued ops return an empty result of the right shape,
  the two losses return 0, every gradient has its input's shape and is 0;
* sizes of one (C = 1, H = 1, W = 1): finite, equal to the float64 reference, gradcheck;
* large and small magnitudes (1e30 / 1e-30 in float32 and bfloat16, 1e4 / 1e-4 in float16):
  the float64 reference rounded to the dtype, finite wherever that is finite.
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pyamalgam import ops
from pyamalgam.ops import reference as ref

P = torch.ops.pyamalgam
f64 = torch.float64
INT64_MAX = 2**63 - 1


def _randn(*shape, dtype=f64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=f64, generator=g) * scale).to(dtype)


def _cc_args(b, c, h, w, r=2, dtype=f64, scale=1.0):
    return (_randn(b, c, h, w, dtype=dtype, scale=scale, seed=1), _randn(r, c, dtype=dtype, seed=2),
            _randn(r, dtype=dtype, seed=3), _randn(c, r, dtype=dtype, seed=4), _randn(c, dtype=dtype, seed=5))


def _leaf(ts):
    return [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in ts]


def _forward_backward(fn, args, grad_out=None):
    """fn(*args) and the gradients of every floating tensor argument (in order)."""
    args = _leaf(args)
    out = fn(*args)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    out.backward(grad_out)
    return out.detach(), [a.grad for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


# ------------------------------------------------------------------------------------------------
# soft_argmax_depth with 0 bins: refused everywhere (it returned NaN).

ZERO_BINS = r"logits must have at least one depth bin \(logits.shape\[1\] >= 1\), got shape \(2, 0, 3, 3\)"


def test_soft_argmax_zero_bins_python_api():
    with pytest.raises(ValueError, match="^" + ZERO_BINS + "$"):
        ops.soft_argmax_depth(torch.randn(2, 0, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"logits must have at least one depth bin"):
        ops.soft_argmax_depth(torch.randn(0, 0, 0, 0), 0.5)  # empty in every way: still refused


DIRECT_ZERO_BINS = [
    ("forward", lambda: P.soft_argmax_depth.default(torch.randn(2, 0, 3, 3), 0.5), "soft_argmax_depth: "),
    ("backward", lambda: P.soft_argmax_depth_backward.default(torch.randn(2, 3, 3), torch.randn(2, 0, 3, 3), 0.5),
     "soft_argmax_depth_backward: "),
]


@pytest.mark.parametrize("case", DIRECT_ZERO_BINS, ids=[c[0] for c in DIRECT_ZERO_BINS])
def test_soft_argmax_zero_bins_direct_and_fake(case):
    _, call, prefix = case
    with pytest.raises(RuntimeError, match="^" + prefix + ZERO_BINS + "$") as direct:
        call()
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=prefix + ZERO_BINS) as fake:
            call()
    assert str(fake.value) == str(direct.value)


def test_soft_argmax_zero_bins_compile_refuses():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: P.soft_argmax_depth.default(x, 0.5), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="soft_argmax_depth: " + ZERO_BINS):
        fn(torch.randn(2, 0, 3, 3))


# ------------------------------------------------------------------------------------------------
# pairwise_affinity_loss with a patch larger than the map: one node per image (2**63 - 1 gave NaN).

HUGE_PATCHES = [8, 9, 2**31, 2**62, INT64_MAX - 1, INT64_MAX]


@pytest.mark.parametrize("patch", HUGE_PATCHES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pairwise_patch_beyond_the_map_is_one_node_per_image(patch, layout):
    fs, ft = _randn(2, 4, 5, 8, seed=1), _randn(2, 3, 5, 8, seed=2)
    if layout == "channels_last":
        fs, ft = fs.to(memory_format=torch.channels_last), ft.to(memory_format=torch.channels_last)
    # patch = max(H, W) = 8 already makes one cell of the whole image.
    want, want_grads = _forward_backward(lambda a, b: ops.pairwise_affinity_loss(a, b, 8), [fs, ft])
    got, grads = _forward_backward(lambda a, b: ops.pairwise_affinity_loss(a, b, patch), [fs, ft])
    assert torch.isfinite(got) and torch.equal(got, want)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and torch.equal(g, w)
    assert torch.equal(P.pairwise_affinity_loss.default(fs, ft, patch), want)
    g_s, g_t = P.pairwise_affinity_loss_backward.default(torch.tensor(1.0, dtype=f64), fs, ft, patch)
    assert torch.equal(g_s, want_grads[0]) and torch.equal(g_t, want_grads[1])
    # The reference defines the same: it pools one node per image, never an overflowing size.
    torch.testing.assert_close(ref.pairwise_affinity_loss(fs, ft, patch), want, rtol=1e-10, atol=1e-12)


def test_pairwise_patch_beyond_int64_python_api():
    """The schema's int is int64: a larger Python int gives the same one node per image."""
    fs, ft = _randn(2, 4, 5, 6, seed=1), _randn(2, 3, 5, 6, seed=2)
    want = ops.pairwise_affinity_loss(fs, ft, 6)
    for patch in (2**63, 2**64, 10**30):
        assert torch.equal(ops.pairwise_affinity_loss(fs, ft, patch), want)


def test_pairwise_patch_beyond_the_map_fake_kernel():
    with FakeTensorMode():
        fs, ft = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
        assert P.pairwise_affinity_loss.default(fs, ft, INT64_MAX).shape == ()
        g_s, _ = P.pairwise_affinity_loss_backward.default(torch.tensor(1.0), fs, ft, INT64_MAX)
        assert g_s.shape == fs.shape


def test_pairwise_ragged_patch_unchanged():
    """A patch below max(H, W) is not touched by the clamp: bit-identical to before."""
    fs, ft = _randn(2, 4, 5, 8, seed=1), _randn(2, 3, 5, 8, seed=2)
    for patch in (1, 2, 3, 5, 7):
        torch.testing.assert_close(ops.pairwise_affinity_loss(fs, ft, patch), ref.pairwise_affinity_loss(fs, ft, patch),
                                   rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# si_depth_loss whose value overflows the dtype: inf, as the float64 reference rounded to the dtype
# (a RuntimeError "value cannot be converted to type float without overflow" before).

@pytest.mark.parametrize("dtype,value", [(torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float32, 3e19),
                                         (torch.float16, 300.0)])
def test_si_depth_loss_overflow_is_inf(dtype, value):
    pred = _randn(2, 4, 5, scale=value, seed=1).to(dtype)
    target = _randn(2, 4, 5, scale=value, seed=2).to(dtype)
    want = ref.si_depth_loss(pred.double(), target.double()).to(dtype)
    assert torch.isinf(want)  # the float64 value is beyond the dtype's range
    for loss in (ops.si_depth_loss(pred, target), P.si_depth_loss.default(pred, target, None)):
        assert loss.dtype == dtype and torch.equal(loss, want)
    # The gradient is in range: finite, and the reference's.
    got, grads = _forward_backward(ops.si_depth_loss, [pred, target])
    _, ref_grads = _forward_backward(ref.si_depth_loss, [pred.double(), target.double()])
    for g, w in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, **_tol(dtype, w))


def test_si_depth_loss_just_in_range_is_finite():
    """A float32 loss near the top of the range: finite, although its squares are not float32."""
    pred = _randn(3, 8, 8, scale=1e19, seed=1).float()
    target = _randn(3, 8, 8, scale=1e19, seed=2).float()
    want = ref.si_depth_loss(pred.double(), target.double())
    assert want < torch.finfo(torch.float32).max
    got = ops.si_depth_loss(pred, target)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_coding_plane_sums_near_the_float32_limit(layout):
    """Features of ~3e37: a run of 16 of them overflows a float sum (before, on NCHW, the pooled
    mean became inf and the scale saturated to 1), their mean does not."""
    x = torch.full((1, 2, 32, 32), 3e37) * torch.linspace(0.5, 1.0, 32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w1, b1, w2, b2 = torch.full((1, 2), 1e-37), torch.zeros(1), torch.ones(2, 1), torch.zeros(2)
    grad_out = torch.ones(1, 2, 32, 32)
    got, grads = _forward_backward(ops.channel_coding, [x, w1, b1, w2, b2], grad_out)
    want, ref_grads = _forward_backward(ref.channel_coding, [t.double() for t in (x, w1, b1, w2, b2)], grad_out.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for g, w in zip(grads, ref_grads):
        w_rounded = w.to(torch.float32)
        finite = torch.isfinite(w_rounded)
        torch.testing.assert_close(g[~finite], w_rounded[~finite], rtol=0, atol=0)  # +-inf where it overflows
        torch.testing.assert_close(g[finite].double(), w[finite], **_tol(torch.float32, w[finite]))


# ------------------------------------------------------------------------------------------------
# Empty inputs: map-valued ops give an empty result of the right shape, losses 0, gradients 0.

def _cc_case(shape):
    return ops.channel_coding, P.channel_coding.default, ref.channel_coding, list(_cc_args(*shape))


def _sa_case(shape):
    return ops.soft_argmax_depth, P.soft_argmax_depth.default, ref.soft_argmax_depth, [_randn(*shape), 0.5]


def _si_case(shape, masked):
    pred, target = _randn(*shape, seed=1), _randn(*shape, seed=2)
    mask = torch.ones(shape, dtype=torch.bool) if masked else None
    return ops.si_depth_loss, P.si_depth_loss.default, ref.si_depth_loss, [pred, target, mask]


def _pw_case(shape, patch):
    b, c, h, w = shape
    return (ops.pairwise_affinity_loss, P.pairwise_affinity_loss.default, ref.pairwise_affinity_loss,
            [_randn(*shape, seed=1), _randn(b, c + 1, h, w, seed=2), patch])


EMPTY_4D = [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (0, 3, 0, 0)]
EMPTY_CASES = (
    [(f"channel_coding{s}", lambda s=s: _cc_case(s)) for s in EMPTY_4D + [(2, 0, 4, 5), (2, 0, 0, 5)]]
    + [(f"soft_argmax_depth{s}", lambda s=s: _sa_case(s)) for s in EMPTY_4D]
    + [(f"si_depth_loss{s}-mask{m}", lambda s=s, m=m: _si_case(s, m))
       for s in [(0, 4, 5), (2, 0, 5), (2, 4, 0), (0, 1, 4, 5), (2, 1, 0, 5)] for m in (False, True)]
    + [(f"pairwise{s}-patch{p}", lambda s=s, p=p: _pw_case(s, p)) for s in EMPTY_4D for p in (1, 2, INT64_MAX)]
)


def _check_empty_result(name, out, args):
    x = args[0]
    if name.startswith("channel_coding"):
        assert out.shape == x.shape and out.numel() == 0
    elif name.startswith("soft_argmax_depth"):
        assert out.shape == (x.shape[0], x.shape[2], x.shape[3]) and out.numel() == 0
    else:  # a loss of nothing: 0, never NaN
        assert out.shape == () and torch.equal(out, torch.zeros((), dtype=x.dtype)), out
    assert out.dtype == x.dtype


def _check_zero_grads(grads, args):
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert len(grads) == len(floats)
    for g, a in zip(grads, floats):
        assert g is not None and g.shape == a.shape and g.dtype == a.dtype
        assert torch.equal(g, torch.zeros_like(a)), g  # weights too: the result does not depend on them


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_python_api_and_reference(case):
    name, make = case
    api, _, reference, args = make()
    for fn in (api, reference):
        out, grads = _forward_backward(fn, args)
        _check_empty_result(name, out, args)
        _check_zero_grads(grads, args)


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_direct_overloads_and_fake_kernels(case):
    name, make = case
    api, op, _, args = make()
    out = op(*args)
    _check_empty_result(name, out, args)
    backward = getattr(P, op._schema.name.split("::")[1] + "_backward").default
    grad = torch.ones_like(out)
    grads = backward(grad, *args)
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    _check_zero_grads(grads[: len(floats)], args)
    # The fake kernels promise the same shapes, dtypes and strides.
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_out = op(*fake_args)
        fake_grads = backward(mode.from_tensor(grad), *fake_args)
    assert fake_out.shape == out.shape and fake_out.dtype == out.dtype and fake_out.stride() == out.stride()
    fake_grads = list(fake_grads) if isinstance(fake_grads, (tuple, list)) else [fake_grads]
    for f, g in zip(fake_grads, grads):
        assert f.shape == g.shape and f.dtype == g.dtype and f.stride() == g.stride()


COMPILED_EMPTY = ["channel_coding(0, 3, 4, 5)", "channel_coding(2, 3, 0, 5)", "soft_argmax_depth(0, 3, 4, 5)",
                  "si_depth_loss(0, 4, 5)-maskTrue", "si_depth_loss(2, 4, 0)-maskFalse",
                  "pairwise(0, 3, 4, 5)-patch1", "pairwise(2, 3, 4, 0)-patch2"]


@pytest.mark.parametrize("case", [c for c in EMPTY_CASES if c[0] in COMPILED_EMPTY], ids=COMPILED_EMPTY)
def test_empty_compile_fullgraph(case):
    name, make = case
    api, _, _, args = make()
    torch._dynamo.reset()
    compiled = torch.compile(api, fullgraph=True, backend="aot_eager")
    out, grads = _forward_backward(compiled, args)
    _check_empty_result(name, out, args)
    _check_zero_grads(grads, args)


# ------------------------------------------------------------------------------------------------
# Sizes of one: finite, the float64 reference, gradcheck.

ONE_SHAPES = [(1, 1, 1, 1), (2, 1, 3, 4), (2, 3, 1, 4), (2, 3, 4, 1), (1, 1, 1, 5), (3, 2, 1, 1)]


def _one_cases():
    cases = []
    for s in ONE_SHAPES:
        b, c, h, w = s
        cases.append((f"channel_coding{s}", *_cc_case(s)[1:3], list(_cc_args(*s, r=1))))
        cases.append((f"channel_coding_r0{s}", *_cc_case(s)[1:3], list(_cc_args(*s, r=0))))
        cases.append((f"soft_argmax_depth{s}", P.soft_argmax_depth.default, ref.soft_argmax_depth,
                      [_randn(*s), 0.7]))
        pred, target = _randn(b, h, w, seed=1), _randn(b, h, w, seed=2)
        mask = torch.rand(b, h, w, generator=torch.Generator().manual_seed(3)) < 0.6
        cases.append((f"si_depth_loss{(b, h, w)}", P.si_depth_loss.default, ref.si_depth_loss, [pred, target, None]))
        cases.append((f"si_depth_loss_masked{(b, h, w)}", P.si_depth_loss.default, ref.si_depth_loss,
                      [pred, target, mask]))
        for patch in (1, 2):
            cases.append((f"pairwise{s}-patch{patch}", P.pairwise_affinity_loss.default, ref.pairwise_affinity_loss,
                          [_randn(*s, seed=1), _randn(b, 1, h, w, seed=2), patch]))
    return cases


ONE_CASES = _one_cases()


@pytest.mark.parametrize("case", ONE_CASES, ids=[c[0] for c in ONE_CASES])
def test_sizes_of_one_match_reference(case):
    _, op, reference, args = case
    out = op(*args)
    g = _randn(*out.shape, seed=9)
    got, grads = _forward_backward(op, args, g)
    want, ref_grads = _forward_backward(reference, args, g)
    assert torch.isfinite(got).all() and all(torch.isfinite(x).all() for x in grads)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in ONE_CASES if "(1, 1, 1" in c[0] or "(2, 3, 1, 4)" in c[0]],
                         ids=[c[0] for c in ONE_CASES if "(1, 1, 1" in c[0] or "(2, 3, 1, 4)" in c[0]])
def test_sizes_of_one_gradcheck(case):
    _, op, _, args = case
    assert torch.autograd.gradcheck(lambda *a: op(*a), _leaf(args), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Large and small magnitudes: the float64 reference rounded to the dtype, finite where it is.

MAGNITUDES = [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.bfloat16, 1e30), (torch.bfloat16, 1e-30),
              (torch.float16, 1e4), (torch.float16, 1e-4)]


def _tol(dtype, want):
    rtol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, f64: 1e-10}[dtype]
    # absolute tolerance relative to the result's own scale (its values may be ~1e-30), plus the
    # dtype's smallest subnormal: a value below it rounds to 0
    scale = want.abs().max().item() if want.numel() else 0.0
    scale = scale if math.isfinite(scale) else 0.0
    info = torch.finfo(dtype)
    return {"rtol": rtol, "atol": rtol * scale + info.smallest_normal * info.eps}


def _magnitude_cases(dtype, m):
    b, c, h, w = 2, 4, 5, 6
    x, w1, b1, w2, b2 = _cc_args(b, c, h, w, dtype=dtype, scale=m)
    # bin scores O(m): 1e30 makes a one-hot softmax, 1e-30 a uniform one
    logits = _randn(b, 6, h, w, dtype=dtype, scale=m, seed=6)
    pred = (_randn(b, h, w, seed=7).abs() * m).to(dtype)
    target = (_randn(b, h, w, seed=8).abs() * m).to(dtype)
    mask = torch.rand(b, h, w, generator=torch.Generator().manual_seed(9)) < 0.7
    fs, ft = _randn(b, c, h, w, dtype=dtype, scale=m, seed=10), _randn(b, 3, h, w, dtype=dtype, scale=m, seed=11)
    return [
        ("channel_coding", ops.channel_coding, ref.channel_coding, [x, w1, b1, w2, b2]),
        ("soft_argmax_depth", ops.soft_argmax_depth, ref.soft_argmax_depth, [logits, 0.25]),
        ("si_depth_loss", ops.si_depth_loss, ref.si_depth_loss, [pred, target, mask]),
        ("pairwise_p1", ops.pairwise_affinity_loss, ref.pairwise_affinity_loss, [fs, ft, 1]),
        ("pairwise_p2", ops.pairwise_affinity_loss, ref.pairwise_affinity_loss, [fs, ft, 2]),
    ]


MAG_CASES = [(f"{name}-{str(dt).split('.')[1]}-{m:g}", dt, m, i) for dt, m in MAGNITUDES
             for i, (name, *_r) in enumerate(_magnitude_cases(torch.float32, 1.0))]


@pytest.mark.parametrize("case", MAG_CASES, ids=[c[0] for c in MAG_CASES])
def test_extreme_magnitudes_follow_the_float64_reference(case):
    _, dtype, m, i = case
    _, api, reference, args = _magnitude_cases(dtype, m)[i]
    out = api(*args)
    grad_out = _randn(*out.shape, seed=12)
    got, grads = _forward_backward(api, args, grad_out.to(dtype))
    want, ref_grads = _forward_backward(reference, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                    else a for a in args], grad_out)
    # The float64 result rounded to the dtype: where that is finite, so must the fused op be.
    for g, w in [(got, want), *zip(grads, ref_grads)]:
        w_rounded = w.to(dtype)
        assert g.dtype == dtype
        finite = torch.isfinite(w_rounded)
        assert torch.isfinite(g[finite]).all(), f"non-finite where the reference is finite: {g} vs {w}"
        # +-inf (or NaN) as the reference rounds
        torch.testing.assert_close(g[~finite], w_rounded[~finite], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g[finite].double(), w[finite], **_tol(dtype, w[finite]))

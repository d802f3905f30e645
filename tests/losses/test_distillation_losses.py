"""The distillation losses of thesis 003 (pyamalgam.losses.distillation) against float64 formulas
written out in full, on awkward shapes, plus their errors and the Eq. 3.4 objective."""
import math

import pytest
import torch

from pyamalgam import losses as L
from pyamalgam import ops
from pyamalgam.nn import Connector
from pyamalgam.ops import reference as ref

F64 = torch.float64
# (B, K, H, W): B = 1, K = 2, odd sizes, a single row / column.
SHAPES = [(1, 2, 1, 1), (1, 3, 5, 3), (2, 4, 7, 9), (3, 19, 4, 5), (1, 5, 13, 1)]


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


# --- pixel-wise (Eq. 3.1) ----------------------------------------------------------------------------

def _pixel_reference(zs, zt, t, mask, order):
    """Eq. 3.1 with explicit probabilities: mean over valid pixels of sum_k p log(p / q), times T^2."""
    qs, qt = torch.softmax(zs / t, 1), torch.softmax(zt / t, 1)
    p, q = (qs, qt) if order == "thesis" else (qt, qs)
    kl = (p * torch.log(p / q)).sum(1)
    if mask is None:
        return t * t * kl.mean()
    return t * t * kl[mask].sum() / max(int(mask.sum()), 1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("order", ["thesis", "teacher"])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_pixel_wise_matches_the_written_out_formula(shape, order, t):
    zs, zt = _rand(*shape, scale=3, seed=1), _rand(*shape, scale=3, seed=2)
    b, _, h, w = shape
    mask = torch.rand(b, h, w, generator=torch.Generator().manual_seed(3)) < 0.6
    for m in (None, mask, mask[:, None]):
        got = L.pixel_wise_loss(zs, zt, t, m, order=order)
        want = _pixel_reference(zs, zt, t, None if m is None else m.reshape(b, h, w), order)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_pixel_wise_order_is_the_printed_one():
    """KL is asymmetric: the default is KL(q^s || q^t) (Eq. 3.1), 'teacher' swaps the arguments."""
    zs, zt = _rand(2, 4, 3, 3, scale=2, seed=4), _rand(2, 4, 3, 3, scale=2, seed=5)
    thesis = L.pixel_wise_loss(zs, zt)
    assert not torch.allclose(thesis, L.pixel_wise_loss(zs, zt, order="teacher"))
    torch.testing.assert_close(thesis, L.pixel_wise_loss(zt, zs, order="teacher"))
    qs = torch.softmax(zs, 1)
    torch.testing.assert_close(thesis, (qs * (qs.log() - torch.log_softmax(zt, 1))).sum(1).mean())


def test_pixel_wise_gradcheck_with_mask():
    zs, zt = _rand(2, 3, 4, 5, seed=6).requires_grad_(), _rand(2, 3, 4, 5, seed=7).requires_grad_()
    mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(8)) < 0.5
    assert torch.autograd.gradcheck(lambda s, t: L.pixel_wise_loss(s, t, 1.7, mask), (zs, zt))


def test_pixel_wise_ignores_masked_pixels_entirely():
    zs, zt = _rand(1, 3, 2, 2, seed=9), _rand(1, 3, 2, 2, seed=10)
    mask = torch.tensor([[[True, False], [True, True]]])
    zs_nan = zs.clone()
    zs_nan[0, :, 0, 1] = float("nan")
    zs_nan.requires_grad_()
    loss = L.pixel_wise_loss(zs_nan, zt, mask=mask)
    loss.backward()
    torch.testing.assert_close(loss, L.pixel_wise_loss(zs, zt, mask=mask))
    assert torch.isfinite(zs_nan.grad).all() and (zs_nan.grad[0, :, 0, 1] == 0).all()


def test_pixel_wise_no_valid_pixel_gives_zero_and_zero_gradients():
    zs = _rand(2, 3, 2, 2, seed=11).requires_grad_()
    loss = L.pixel_wise_loss(zs, _rand(2, 3, 2, 2, seed=12), mask=torch.zeros(2, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(zs))


def test_pixel_wise_is_zero_for_equal_logits_and_float32_works():
    z = torch.randn(2, 5, 6, 7)
    assert L.pixel_wise_loss(z, z.clone()).abs().item() < 1e-6
    assert L.pixel_wise_loss(z.half(), z.half()).dtype == torch.float16


@pytest.mark.parametrize("call, err, pattern", [
    (lambda: L.pixel_wise_loss(_rand(2, 1, 3, 3), _rand(2, 1, 3, 3)), ValueError, r"student_logits must have at least 2 channels"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3), _rand(2, 3, 3)), ValueError, r"student_logits must be \(B, C, H, W\)"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 4)), ValueError, r"student_logits and teacher_logits must have the same shape"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), torch.ones(2, 3, 3, 3, dtype=torch.long)), TypeError, r"teacher_logits must be a floating-point"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), 0.0), ValueError, r"temperature must be a finite number > 0"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), mask=torch.ones(2, 3, 3)), TypeError, r"mask must be a bool tensor"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), mask=torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 3, 3\)"),
    (lambda: L.pixel_wise_loss(_rand(2, 3, 3, 3), _rand(2, 3, 3, 3), order="student"), ValueError, r"order must be one of"),
])
def test_pixel_wise_bad_input_names_the_argument(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()


# --- pair-wise (Eq. 3.2) -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 9), (1, 5, 13, 1)], ids=str)
@pytest.mark.parametrize("radius, patch", [(0, 1), (1, 1), (2, 2), (1, 3), (50, 2)])
def test_pair_wise_local_matches_the_full_neighbourhood_matrix(shape, radius, patch):
    b, c, h, w = shape
    fs, ft = _rand(b, c, h, w, seed=13), _rand(b, c + 2, h, w, seed=14)
    torch.testing.assert_close(L.pair_wise_loss(fs, ft, radius, patch), ref.pairwise_local_loss(fs, ft, radius, patch),
                               rtol=1e-9, atol=1e-12)


def test_pair_wise_full_graph_is_the_full_op_and_a_covering_window_equals_it():
    fs, ft = _rand(2, 3, 6, 5, seed=15), _rand(2, 4, 6, 5, seed=16)
    full = L.pair_wise_loss(fs, ft, None, 2)
    torch.testing.assert_close(full, ops.pairwise_affinity_loss(fs, ft, 2))
    torch.testing.assert_close(full, ref.pairwise_local_loss(fs, ft, 2, 2), rtol=1e-9, atol=1e-12)  # grid 3x3, r = 2
    torch.testing.assert_close(full, L.pair_wise_loss(fs, ft, 10**9, 2))


def test_pair_wise_normaliser_is_the_thesis_one():
    """beta / (W'H' alpha) sum_i sum_j: a single differing pair, counted in both orders."""
    fs = torch.zeros(1, 2, 1, 3, dtype=F64)
    fs[0, 0] = 1.0
    ft = fs.clone()
    ft[0, :, 0, 2] = torch.tensor([0.0, 1.0])  # node 2 turns orthogonal to nodes 0 and 1 for the teacher
    # radius 1 on a 1x3 grid: alpha = 1 * 3, N = 3; pairs (1, 2), (2, 1) differ by 1.
    assert L.pair_wise_loss(fs, ft, 1).item() == pytest.approx(2 / (3 * 3))


def test_table_3_2_fusions():
    assert L.table_3_2_radii(64, 64) == [None, 8, 4]  # grid 32: windows 32, 16 (r 8 -> 17), 8 (r 4 -> 9)
    fs, ft = _rand(1, 3, 16, 12, seed=17), _rand(1, 3, 16, 12, seed=18)
    radii = L.table_3_2_radii(16, 12)
    torch.testing.assert_close(L.alpha_fusion(fs, ft), sum(L.pair_wise_loss(fs, ft, r, 2) for r in radii))
    torch.testing.assert_close(L.beta_fusion(fs, ft),
                               sum(ops.pairwise_affinity_loss(fs, ft, p) for p in (2, 4, 8)))
    with pytest.raises(ValueError, match="radii must name"):
        L.alpha_fusion(fs, ft, radii=[])


@pytest.mark.parametrize("call, err, pattern", [
    (lambda: L.pair_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 3), -1), ValueError, r"radius must be >= 0"),
    (lambda: L.pair_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 3), 1.5), TypeError, r"radius must be an int"),
    (lambda: L.pair_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 3), 1, 0), ValueError, r"patch must be >= 1"),
    (lambda: L.pair_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 4), 1), ValueError, r"fs and ft must have the same batch and spatial sizes"),
    (lambda: L.pair_wise_loss(_rand(2, 3, 3), _rand(2, 3, 3), 1), ValueError, r"fs must"),
])
def test_pair_wise_bad_input_names_the_argument(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()


# --- channel-wise (Eqs. 4.2-4.4) ---------------------------------------------------------------------

def _channel_reference(ys, yt, t):
    """Eq. 4.4 with explicit probabilities: T^2 / C sum_c sum_i p^T log(p^T / p^S), batch mean."""
    b, c = ys.shape[:2]
    ps = torch.softmax(ys.reshape(b, c, -1) / t, -1)
    pt = torch.softmax(yt.reshape(b, c, -1) / t, -1)
    return t * t / c * (pt * torch.log(pt / ps)).sum((1, 2)).mean()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 9), (3, 16, 4, 5), (1, 5, 13, 1)], ids=str)
@pytest.mark.parametrize("t", [1.0, 3.0])
def test_channel_wise_matches_the_written_out_formula(shape, t):
    ys, yt = _rand(*shape, scale=2, seed=19), _rand(*shape, scale=2, seed=20)
    torch.testing.assert_close(L.channel_wise_loss(ys, yt, t), _channel_reference(ys, yt, t), rtol=1e-10, atol=1e-12)


def test_channel_wise_order_is_teacher_first():
    ys, yt = _rand(2, 3, 4, 4, scale=2, seed=21), _rand(2, 3, 4, 4, scale=2, seed=22)
    assert not torch.allclose(L.channel_wise_loss(ys, yt), L.channel_wise_loss(yt, ys))
    torch.testing.assert_close(L.channel_wise_loss(ys, yt, 1.0),
                               torch.stack([torch.nn.functional.kl_div(torch.log_softmax(ys[i].flatten(1), -1),
                                                                       torch.softmax(yt[i].flatten(1), -1),
                                                                       reduction="batchmean") for i in range(2)]).mean())


def test_channel_wise_connector_maps_the_student_channels():
    torch.manual_seed(0)
    conn = Connector(3, 5).double()
    ys, yt = _rand(2, 3, 4, 6, seed=23).requires_grad_(), _rand(2, 5, 4, 6, seed=24)
    loss = L.channel_wise_loss(ys, yt, 3.0, connector=conn)
    torch.testing.assert_close(loss, _channel_reference(conn(ys), yt, 3.0), rtol=1e-10, atol=1e-12)
    loss.backward()
    assert conn.conv.weight.grad is not None and ys.grad is not None
    module = L.ChannelWiseLoss(3.0, conn)
    assert any(p is conn.conv.weight for p in module.parameters())  # trained with the student
    torch.testing.assert_close(module(ys, yt), loss)


def test_connector():
    assert isinstance(Connector.between(4, 4), torch.nn.Identity)
    c = Connector.between(4, 6)
    assert isinstance(c, Connector) and c(torch.randn(2, 4, 3, 3)).shape == (2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"Connector\(4, 6\) expects x of shape \(B, 4, H, W\)"):
        c(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="teacher_channels must be >= 1"):
        Connector(4, 0)


@pytest.mark.parametrize("call, err, pattern", [
    (lambda: L.channel_wise_loss(_rand(1, 2, 3, 3), _rand(1, 4, 3, 3)), ValueError, r"pass connector=pyamalgam.nn.Connector\(2, 4\)"),
    (lambda: L.channel_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 4)), ValueError, r"ys and yt must have the same shape"),
    (lambda: L.channel_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 3), -1.0), ValueError, r"temperature must be a finite number > 0"),
    (lambda: L.channel_wise_loss(_rand(1, 2, 3, 3), _rand(1, 2, 3, 3), connector=3), TypeError, r"connector must be callable"),
    (lambda: L.channel_wise_loss(_rand(2, 3, 3), _rand(2, 3, 3)), ValueError, r"ys must be \(B, C, H, W\)"),
])
def test_channel_wise_bad_input_names_the_argument(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()


# --- the objective of Eq. 3.4 ------------------------------------------------------------------------

def test_objective_combines_the_terms_with_the_thesis_weights():
    zs, zt = _rand(2, 4, 5, 6, seed=25).requires_grad_(), _rand(2, 4, 5, 6, seed=26)
    fs, ft = _rand(2, 3, 5, 6, seed=27).requires_grad_(), _rand(2, 8, 5, 6, seed=28)
    image = _rand(2, 3, 5, 6, seed=29)
    seen = {}

    def critic_score(student_map, img):  # stands in for E[D(Q^s | I)]
        seen["args"] = (student_map, img)
        return student_map.mean() * 0 + 2.0

    objective = L.StructuredObjective(holistic=critic_score)
    out = objective(zs, zt, fs, ft, task_loss=torch.tensor(1.5, dtype=F64), image=image)
    pi, pa = L.pixel_wise_loss(zs, zt), L.pair_wise_loss(fs, ft)
    torch.testing.assert_close(out.total, 1.5 + 10 * (pi + pa) - 0.1 * 2.0)
    assert set(out.terms) == {"mc", "pi", "pa", "ho"} and seen["args"][0] is zs and seen["args"][1] is image
    out.total.backward()
    assert zs.grad is not None and fs.grad is not None


def test_objective_optional_terms_and_errors():
    zs, zt = _rand(1, 3, 4, 4, seed=30), _rand(1, 3, 4, 4, seed=31)
    only_pi = L.StructuredObjective(pair_wise=None)(zs, zt)
    torch.testing.assert_close(only_pi.total, 10 * L.pixel_wise_loss(zs, zt))
    local = L.StructuredObjective(lambda1=1.0, pair_wise=L.PairWiseLoss(radius=1, patch=2), pixel_wise=None)
    torch.testing.assert_close(local(zs, zt, zs, zt * 2 + 1).total, L.pair_wise_loss(zs, zt * 2 + 1, 1, 2))
    with pytest.raises(ValueError, match="pair-wise term needs student_features"):
        L.StructuredObjective()(zs, zt)
    with pytest.raises(TypeError, match="holistic must be callable"):
        L.StructuredObjective(holistic=1)


def test_modules_repr_and_settings():
    assert "radius=1, patch=2" in repr(L.PairWiseLoss(1, 2))
    assert L.ChannelWiseLoss().temperature == 3.0 and L.PixelWiseLoss().temperature == 1.0
    with pytest.raises(ValueError, match="radius must be >= 0"):
        L.PairWiseLoss(-2)
    assert math.isclose(L.StructuredObjective().lambda1, 10) and math.isclose(L.StructuredObjective().lambda2, 0.1)


def test_objective_and_losses_compile_fullgraph():
    torch._dynamo.reset()
    objective = L.StructuredObjective(pair_wise=L.PairWiseLoss(radius=1, patch=2))
    cwd = L.ChannelWiseLoss(3.0)

    def step(zs, zt, fs, ft, mask):
        return objective(zs, zt, fs, ft, mask=mask).total + cwd(fs, ft) + L.alpha_fusion(fs, ft, radii=(None, 1))

    args = [torch.randn(2, 5, 8, 6, requires_grad=True), torch.randn(2, 5, 8, 6),
            torch.randn(2, 4, 8, 6, requires_grad=True), torch.randn(2, 4, 8, 6)]
    mask = torch.rand(2, 8, 6) < 0.7
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args, mask)
    got.backward()
    grads = [args[0].grad.clone(), args[2].grad.clone()]
    for a in args:
        a.grad = None
    want = step(*args, mask)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, [args[0].grad, args[2].grad], rtol=1e-5, atol=1e-6)

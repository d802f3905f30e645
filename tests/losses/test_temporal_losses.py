"""The temporal losses of thesis 003 ch. 5: TL (Eq. 5.1) against an explicit gather reference,
PF (Eq. 5.2) as a module, MF (ConvLSTM over self-affinity maps) and its ConvLSTM."""
import pytest
import torch
import torch.nn.functional as F

from pyamalgam import ops
from pyamalgam.losses import temporal as T
from pyamalgam.nn.convlstm import ConvLSTM
from pyamalgam.ops import reference as ref

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _probs(b, k, h, w, seed):
    return torch.randn(b, k, h, w, generator=_gen(seed), dtype=F64).softmax(1)


def _integer_flow(b, h, w, seed, reach=2):
    return torch.randint(-reach, reach + 1, (b, 2, h, w), generator=_gen(seed)).to(F64)


def _gather_reference(q_t, q_k, flow, image_t=None, image_k=None, visible=None):
    """Eq. 5.1 by explicit indexing, for integer flows (no grid_sample): pixel (v, u) of frame t
    matches (v + dy, u + dx) of frame t+k, or nothing when that lies outside frame t+k."""
    b, _, h, w = q_t.shape
    total = torch.zeros(b, dtype=F64)
    for n in range(b):
        for v in range(h):
            for u in range(w):
                x, y = u + int(flow[n, 0, v, u]), v + int(flow[n, 1, v, u])
                if not (0 <= x < w and 0 <= y < h):
                    continue
                weight = 1.0
                if image_t is not None:
                    weight = torch.exp(-(image_t[n, :, v, u] - image_k[n, :, y, x]).norm())
                if visible is not None:
                    weight = weight * float(visible[n, v, u])
                total[n] += weight * (q_t[n, :, v, u] - q_k[n, :, y, x]).square().sum()
    return (total / (h * w)).mean()


# --- TL, Eq. 5.1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 19, 6, 4)], ids=str)
def test_temporal_loss_matches_the_gather_reference(shape):
    b, k, h, w = shape
    q_t, q_k = _probs(b, k, h, w, 1), _probs(b, k, h, w, 2)
    flow = _integer_flow(b, h, w, 3)
    images = torch.rand(b, 3, h, w, generator=_gen(4), dtype=F64), torch.rand(b, 3, h, w, generator=_gen(5), dtype=F64)
    visible = torch.rand(b, h, w, generator=_gen(6)) < 0.7
    torch.testing.assert_close(T.temporal_loss(q_t, q_k, flow), _gather_reference(q_t, q_k, flow))
    torch.testing.assert_close(T.temporal_loss(q_t, q_k, flow, images=images), _gather_reference(q_t, q_k, flow, *images))
    torch.testing.assert_close(T.temporal_loss(q_t, q_k, flow, visible=visible),
                               _gather_reference(q_t, q_k, flow, visible=visible))


def test_a_translated_prediction_costs_nothing():
    """Frame t+k is frame t moved 2 pixels right: the flow undoes it exactly; the columns that
    leave the frame are not counted."""
    q_t = _probs(2, 4, 6, 9, 7)
    q_k = torch.zeros_like(q_t)
    q_k[..., 2:] = q_t[..., :-2]
    flow = torch.zeros(2, 2, 6, 9, dtype=F64)
    flow[:, 0] = 2.0
    assert T.temporal_loss(q_t, q_k, flow).item() < 1e-20
    assert T.temporal_loss(q_t, q_k, torch.zeros_like(flow)).item() > 1e-3  # no motion compensation: not 0


def test_temporal_loss_gradients_and_masked_non_finite_values():
    q_t, q_k = (_probs(1, 3, 4, 5, s).requires_grad_() for s in (8, 9))
    flow = torch.rand(1, 2, 4, 5, generator=_gen(10), dtype=F64) * 3 - 1.5  # sub-pixel: bilinear weights
    images = torch.rand(1, 3, 4, 5, dtype=F64), torch.rand(1, 3, 4, 5, dtype=F64)
    assert torch.autograd.gradcheck(lambda a, b: T.temporal_loss(a, b, flow, images=images), (q_t, q_k))
    bad = q_t.detach().clone()
    bad[0, :, 1, 1] = float("nan")
    visible = torch.ones(1, 4, 5, dtype=torch.bool)
    visible[0, 1, 1] = False
    assert T.temporal_loss(bad, q_k.detach(), flow, visible=visible).isfinite()


def test_temporal_loss_module_takes_logits():
    z_t, z_k = torch.randn(2, 5, 4, 6, dtype=F64), torch.randn(2, 5, 4, 6, dtype=F64)
    flow = _integer_flow(2, 4, 6, 11)
    torch.testing.assert_close(T.TemporalLoss()(z_t, z_k, flow), T.temporal_loss(z_t.softmax(1), z_k.softmax(1), flow))


def test_occlusion_weight_is_one_for_a_perfect_warp_and_zero_outside():
    image = torch.rand(1, 3, 5, 6, dtype=F64)
    flow = torch.zeros(1, 2, 5, 6, dtype=F64)
    flow[0, 1, 0, 0] = -3.0  # points above the frame
    v = T.occlusion_weight(image, image, flow)
    assert v[0, 0, 0] == 0 and (v.flatten()[1:] == 1).all()


@pytest.mark.parametrize("call, err, pattern", [
    (lambda q, f: T.temporal_loss(q, q[:, :2], f), ValueError, r"q_k must have the shape of q_t"),
    (lambda q, f: T.temporal_loss(q[0], q, f), ValueError, r"q_t must be \(B, C, H, W\)"),
    (lambda q, f: T.temporal_loss(q, q, f[:, :1]), ValueError, r"flow must be \(B, 2, H, W\)"),
    (lambda q, f: T.temporal_loss(q, q, f, images=(q, q), visible=q[:, 0] > 0), ValueError, r"images or visible"),
    (lambda q, f: T.temporal_loss(q, q, f, visible=q[:, :2] > 0), ValueError, r"visible must be \(B, H, W\)"),
    (lambda q, f: T.temporal_loss(q, q, f, images=(q[:, :, :2], q)), ValueError, r"images\[0\] must have the batch"),
    (lambda q, f: T.temporal_loss(q.long(), q, f), TypeError, r"q_t must be a floating"),
])
def test_temporal_loss_bad_input(call, err, pattern):
    q, f = _probs(2, 3, 4, 5, 12), torch.zeros(2, 2, 4, 5, dtype=F64)
    with pytest.raises(err, match=pattern):
        call(q, f)


# --- PF, Eq. 5.2 ---------------------------------------------------------------------------------------------

def test_pair_wise_frames_module_is_the_fused_op():
    maps = [torch.randn(2, 19, 6, 8, dtype=F64, generator=_gen(13 + i)) for i in range(4)]
    probs = [m.softmax(1) for m in maps]
    want = ref.pairwise_frames_loss(*probs, 2)
    torch.testing.assert_close(T.PairWiseFramesLoss(patch=2)(*probs), want)
    torch.testing.assert_close(T.PairWiseFramesLoss(patch=2, softmax=True)(*maps), want)
    torch.testing.assert_close(T.pair_wise_frames_loss(*probs, patch=2), ops.pairwise_frames_loss(*probs, 2))
    with pytest.raises(ValueError, match="patch must be >= 1"):
        T.PairWiseFramesLoss(patch=0)


# --- MF: ConvLSTM over self-affinity maps -----------------------------------------------------------------------

def test_self_affinity_is_the_at_operator():
    f = torch.randn(2, 5, 7, 6, dtype=F64)
    for patch in (1, 3):
        nodes = ref.normalize_nodes(ref.pool_nodes(f, patch))
        torch.testing.assert_close(T.self_affinity(f, patch), (nodes @ nodes.transpose(1, 2))[:, None])
    z = torch.zeros(1, 2, 2, 2, dtype=F64)
    assert not T.self_affinity(z).isnan().any()


def test_convlstm_step_follows_the_equations():
    torch.manual_seed(0)
    cell = ConvLSTM(in_channels=2, hidden=3, kernel_size=3, clip=None).double()
    x1, x2 = torch.randn(2, 2, 5, 4, dtype=F64), torch.randn(2, 2, 5, 4, dtype=F64)
    h = c = torch.zeros(2, 3, 5, 4, dtype=F64)
    embeddings = []
    for x in (x1, x2):
        z = F.conv2d(torch.cat([x, h], 1), cell.gates.weight, cell.gates.bias, padding=1)
        i, f, o, g = z[:, 0:3], z[:, 3:6], z[:, 6:9], z[:, 9:12]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        embeddings.append(h.mean(dim=(2, 3)))
    torch.testing.assert_close(cell([x1, x2]), torch.stack(embeddings, 1))
    torch.testing.assert_close(cell(torch.stack([x1, x2], 1)), torch.stack(embeddings, 1))


def test_convlstm_clip():
    cell = ConvLSTM(hidden=4, clip=0.05)
    assert all(p.abs().max() <= 0.05 for p in cell.parameters())  # starts clipped
    with torch.no_grad():
        cell.gates.weight.mul_(100)
    cell.clip_()
    assert cell.gates.weight.abs().max() <= 0.05
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvLSTM(kernel_size=2)
    with pytest.raises(ValueError, match=r"maps\[1\] must be \(B, 1, H, W\)"):
        cell([torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3)])


def _sequence(b, c, frames, h, w, seed):
    return [torch.randn(b, c, h, w, generator=_gen(seed + t)) for t in range(frames)]


def test_multi_frame_loss_terms_and_gradients():
    torch.manual_seed(1)
    mf = T.MultiFrameLoss(hidden=8, patch=2, enlarge=0.1)
    student = [f.requires_grad_() for f in _sequence(2, 6, 3, 8, 10, 20)]
    teacher = [f.requires_grad_() for f in _sequence(2, 4, 3, 8, 10, 30)]  # other channels
    e_s, e_t = mf.embeddings(student, teacher)
    assert e_s.shape == e_t.shape == (2, 8)
    loss = mf(student, teacher)
    want = (e_t - e_s).square().sum(1).mean() - 0.1 * e_t.square().sum(1).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student)
    assert all(f.grad is None for f in teacher)  # the teacher is fixed (§5.3.3)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mf.parameters())
    same = T.MultiFrameLoss(hidden=8, patch=2, enlarge=0.0)
    assert same([f.detach() for f in student], [f.detach() for f in student]).item() == 0.0


def test_multi_frame_loss_trains_the_student_towards_the_teacher():
    torch.manual_seed(2)
    mf = T.MultiFrameLoss(hidden=8, patch=2, enlarge=0.0)
    teacher = _sequence(1, 4, 3, 6, 6, 40)
    student = [torch.nn.Parameter(torch.randn(1, 5, 6, 6)) for _ in range(3)]
    opt = torch.optim.Adam(student, lr=0.05)
    first = mf(student, teacher).item()
    for _ in range(30):
        opt.zero_grad()
        mf(student, teacher).backward()
        opt.step()
    assert mf(student, teacher).item() < 0.5 * first


@pytest.mark.parametrize("call, pattern", [
    (lambda mf, s, t: mf(s[:2], t), r"student has 2 frames and teacher 3"),
    (lambda mf, s, t: mf(s, [f[:1] for f in t]), r"teacher\[0\] must have the batch and spatial sizes of student\[0\]"),
    (lambda mf, s, t: mf([s[0], s[1][..., :3], s[2]], t), r"student\[1\] must have the shape of student\[0\]"),
    (lambda mf, s, t: mf([], t), r"student must hold at least one frame"),
    (lambda mf, s, t: mf(torch.zeros(1, 2, 3), t), r"student must be \(B, T, C, H, W\)"),
])
def test_multi_frame_loss_bad_input(call, pattern):
    mf = T.MultiFrameLoss(hidden=4)
    with pytest.raises(ValueError, match=pattern):
        call(mf, _sequence(2, 3, 3, 4, 4, 50), _sequence(2, 3, 3, 4, 4, 60))
    with pytest.raises(ValueError, match="enlarge must be >= 0"):
        T.MultiFrameLoss(enlarge=-1.0)

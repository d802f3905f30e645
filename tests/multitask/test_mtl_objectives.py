"""The self-distillation terms, the distillation losses of the task registry and the task
weightings: float64 references that materialise everything, awkward shapes, gradcheck, zero
when the paths agree, the stop-gradient on the decoder side."""
import math

import pytest
import torch
import torch.nn.functional as F
from _mtl_cases import tiny_mtl

from pyamalgam.multitask import (
    SelfDistillation,
    TaskWeighting,
    pool_to,
    sd_feature_loss,
    task_spec,
)
from pyamalgam.multitask.step import MultiTaskStep

SHAPES = [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 5), (3, 8, 4, 9)]


def reference(s, t):
    """mean over pixels of || s/|s| - t/|t| ||^2, pixel by pixel in float64 (zero vector -> 0)."""
    s, t = s.double(), t.double()
    b, _, h, w = s.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                u, v = s[i, :, y, x], t[i, :, y, x]
                u = u / u.norm() if u.norm() > 0 else u
                v = v / v.norm() if v.norm() > 0 else v
                total += float(((u - v) ** 2).sum())
    return total / (b * h * w)


@pytest.mark.parametrize("shape", SHAPES)
def test_feature_term_matches_a_float64_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t[0, :, 0, 0] = 0  # a zero vector counts as zero, no NaN
    got = sd_feature_loss(s, t)
    assert got.dtype == torch.float32 and math.isfinite(float(got))
    assert float(got) == pytest.approx(reference(s, t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_feature_term_gradcheck_float64(shape):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sd_feature_loss, (s, t))


def test_feature_term_vanishes_when_the_paths_agree_and_is_scale_free():
    s = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    assert float(sd_feature_loss(s, s.clone())) == 0.0
    assert float(sd_feature_loss(3.5 * s, s)) == pytest.approx(0.0, abs=1e-12)
    assert float(sd_feature_loss(s, -s)) == pytest.approx(4.0)  # opposite directions: |2u|^2
    zero = torch.zeros(1, 3, 2, 2, requires_grad=True)
    sd_feature_loss(zero, torch.randn(1, 3, 2, 2)).backward()
    assert torch.isfinite(zero.grad).all()


def test_feature_term_errors_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        sd_feature_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="student must be a floating-point"):
        sd_feature_loss(torch.rand(3, 4, 4), torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="cannot pool 6x6 features to 4x4"):
        pool_to(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 4, 4))
    assert torch.equal(pool_to(torch.arange(16.0).view(1, 1, 4, 4), torch.rand(1, 1, 2, 2)),
                       torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


@pytest.mark.parametrize("task, shape", [("seg", (1, 3, 5, 3)), ("depth", (2, 8, 3, 5)), ("normal", (1, 3, 5, 7))])
def test_kd_losses_vanish_when_the_paths_agree_and_match_references(task, shape):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    if task == "normal":
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    kd = task_spec(task).kd_loss
    assert float(kd(s, s.clone())) == pytest.approx(0.0, abs=1e-12)
    if task == "normal":
        want = float((1 - (s * t).sum(1)).mean())
    else:  # KL(q_t || q_s) per pixel, averaged
        qt, qs = torch.softmax(t, 1), torch.softmax(s, 1)
        want = float((qt * (qt.log() - qs.log())).sum(1).mean())
    assert float(kd(s, t)) == pytest.approx(want, rel=1e-6)
    s.requires_grad_(True)
    kd(s, t.requires_grad_(True)).backward()
    assert t.grad is None  # the teacher side is detached


def _step(sd, seed=0):
    net = tiny_mtl(shallow=True, seed=seed).double().train()
    specs = {t: task_spec(t) for t in net.tasks}
    return MultiTaskStep(net, specs, TaskWeighting(list(net.tasks)), sd).double()


def _batch():
    from _mtl_cases import Labelled

    d = Labelled(2)
    return {"image": d.image.double(), "seg": d.seg, "depth": d.depth.double(), "normal": d.normal.double(),
            "mask": d.mask}


@pytest.mark.parametrize("space", ["encoder", "decoder"])
@pytest.mark.parametrize("full", [False, True])
def test_step_feature_term_is_the_formula_and_stops_the_gradient_at_the_decoder(space, full):
    step = _step(SelfDistillation(space, "star", full=full))
    b = _batch()
    out = step.net.forward_train(b["image"], shallow=True)
    _, terms = step(b["image"], b)
    sources = list(step.net.tasks) if full else ["seg"]
    want = []
    for t in sources:  # the float64 reference, by hand
        d = F.avg_pool2d(out["features"][t], 2)
        if space == "encoder":
            a = step.adaptors[t]
            want.append(reference(out["encoded"], F.conv2d(d, a.weight, a.bias)))
        else:
            want.append(reference(out["s_adapted"][t], d))
    assert float(terms["sd/feature"]) == pytest.approx(sum(want) / len(want), rel=1e-9)
    assert set(step.adaptors) == (set(sources) if space == "encoder" else set())
    step.zero_grad(set_to_none=True)
    terms["sd/feature"].backward()
    grads = {n for n, p in step.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("net.encoder.") for n in grads)
    assert not any(n.startswith(("net.decoders.", "net.heads.")) for n in grads)  # sg(D_t): the teacher side


@pytest.mark.parametrize("space", ["encoder", "decoder"])
def test_sd_terms_vanish_when_the_paths_agree(space, monkeypatch):
    step = _step(SelfDistillation(space, "star2", full=True))
    b = _batch()
    real = step.net.forward_train

    def agreeing(x, shallow=None):  # the S path equals the T path, features agree in each space
        out = real(x, shallow=True)
        out["s_kd"] = {t: v.clone() for t, v in out["kd"].items()}
        for t, d in out["features"].items():
            pooled = F.avg_pool2d(d, 2)
            out["s_adapted"][t] = pooled.clone()
            if space == "encoder":  # E := A_t(P(D_t)) for every t: one shared A, so all agree at once
                a = step.adaptors[t]
                with torch.no_grad():
                    a.weight.copy_(step.adaptors["seg"].weight)
                    a.bias.copy_(step.adaptors["seg"].bias)
        if space == "encoder":
            out["encoded"] = step.adaptors["seg"](F.avg_pool2d(out["features"]["seg"], 2))
            for t in out["features"]:
                out["features"][t] = out["features"]["seg"]
        return out

    monkeypatch.setattr(step.net, "forward_train", agreeing)
    _, terms = step(b["image"], b)
    assert float(terms["sd/output"]) == pytest.approx(0.0, abs=1e-12)
    assert float(terms["sd/feature"]) == pytest.approx(0.0, abs=1e-12)


def test_self_distillation_settings_are_checked():
    with pytest.raises(ValueError, match="space must be one of"):
        SelfDistillation("middle")
    with pytest.raises(ValueError, match="variant must be one of"):
        SelfDistillation("encoder", "star3")
    with pytest.raises(ValueError, match="feature_weight must be a finite number >= 0"):
        SelfDistillation(feature_weight=-1.0)
    assert SelfDistillation(full=True).sources(["a", "b"]) == ["a", "b"] and SelfDistillation().sources("ab") == ["a"]
    assert SelfDistillation(variant="star2", full=True).label() == "(★★) full"


def test_weightings():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    total, w = TaskWeighting(["a", "b"])(losses)
    assert float(total) == 2.5 and w == {"a": 1.0, "b": 1.0}
    u = TaskWeighting(["a", "b"], "uncertainty")
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([math.log(2.0), 0.0]))
    total, w = u(losses)
    assert float(total) == pytest.approx(2.0 / 2 + math.log(2.0) + 0.5)  # exp(-s) L + s
    total.backward()
    assert u.log_var.grad is not None
    dwa = TaskWeighting(["a", "b"], "dwa", period=2)
    seq = [(4.0, 1.0), (4.0, 1.0), (2.0, 1.0), (2.0, 1.0), (1.0, 1.0)]
    weights = [dwa({"a": torch.tensor(x), "b": torch.tensor(y)})[1] for x, y in seq]
    assert weights[:4] == [{"a": 1.0, "b": 1.0}] * 4  # the first two periods
    r = torch.tensor([2.0 / 4.0, 1.0])  # Lbar(k-1) / Lbar(k-2)
    want = (2 * torch.softmax(r / 2.0, 0)).tolist()
    assert list(weights[4].values()) == pytest.approx(want)
    assert {"last", "running", "counts"} <= set(dwa.state_dict())  # checkpointed with the network
    with pytest.raises(ValueError, match="weighting must be one of"):
        TaskWeighting(["a"], "gradnorm")

"""Holistic distillation (thesis 003, Eqs. 3.3-3.4): the critic (pyamalgam.nn.discriminator) and the
WGAN-GP term (pyamalgam.losses.holistic) against float64 computations written out here."""
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pyamalgam.losses import HolisticDistillation, StructuredObjective, gradient_penalty, wasserstein_critic_loss
from pyamalgam.nn import Discriminator, RunningInputNorm, SelfAttention2d, discriminator_a2l4
from pyamalgam.nn.discriminator import _ResidualDown

F64 = torch.float64
# (B, C, H, W): B = 1, C = 1, 1x1, odd sizes, a single column.
SHAPES = [(1, 1, 1, 1), (1, 3, 7, 9), (2, 4, 13, 1), (3, 2, 5, 6)]


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def _tiny(num_classes=3, in_chans=3, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"width": 2, "blocks": 2, "attention": 1, **kw}
    return Discriminator(num_classes, in_chans, **kw).double()


def _ho(num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"width": 2, "blocks": 2, "attention": 1, **kw}
    return HolisticDistillation(num_classes, **kw).double()


def _batch(b=2, c=3, h=7, w=5, seed=0):
    s, t = _rand(b, c, h, w, seed=seed), _rand(b, c, h, w, seed=seed + 1, scale=2) + 1
    img = torch.rand(b, 3, h, w, dtype=F64, generator=torch.Generator().manual_seed(seed + 2)) * 255
    return s, t, img


# --- the critic's structure --------------------------------------------------------------------------

def _layout(d):
    """'R' per residual block, 'A' per attention block, in order."""
    return "".join("R" if isinstance(m, _ResidualDown) else "A" for m in d.body)


def test_a2l4_is_the_thesis_critic():
    d = discriminator_a2l4(19)
    assert d.arch == "A2L4" and _layout(d) == "RRRARA"  # attention "between the final three layers"
    widths = [m.conv1.out_channels for m in d.body if isinstance(m, _ResidualDown)]
    assert widths == [64, 128, 256, 512]  # attention at 256 and 512 channels, as the public code
    assert isinstance(d.input_norm, RunningInputNorm) and d.input_norm.channels == 19 + 3
    assert d.head.out_channels == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert HolisticDistillation(19).critic.arch == "A2L4"


@pytest.mark.parametrize("n,m,layout", [(0, 4, "RRRR"), (1, 4, "RRRRA"), (4, 4, "RARARARA"), (2, 3, "RRARA"),
                                        (2, 2, "RARA"), (0, 1, "R")])
def test_anlm_variants_put_attention_after_the_last_n_blocks(n, m, layout):
    d = Discriminator(3, attention=n, blocks=m, width=2)
    assert d.arch == f"A{n}L{m}" and _layout(d) == layout
    assert sum(isinstance(x, SelfAttention2d) for x in d.modules()) == n
    out = d(torch.randn(1, 3, 9, 7), torch.rand(1, 3, 9, 7))
    assert out.shape == (1,) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_odd_sizes_and_b1_give_one_finite_score_per_image(shape):
    b, c, h, w = shape
    d = _tiny(c, blocks=3, attention=2)
    q, img = _rand(*shape), torch.rand(b, 3, h, w, dtype=F64)
    smap = d.score_map_of(q, img)
    assert smap.shape == (b, 1, -(-h // 8), -(-w // 8))
    out = d(q, img)
    assert out.shape == (b,) and torch.isfinite(out).all()
    assert torch.allclose(out, smap.mean(dim=(1, 2, 3)))


def test_scores_are_per_sample():
    """No batch statistics anywhere: a sample's score does not depend on the rest of the batch."""
    d = _tiny()
    s, t, img = _batch(b=3)
    d.update_input_stats(torch.cat([t, s]), torch.cat([img, img]))
    together = d(s, img)
    alone = torch.cat([d(s[i:i + 1], img[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_softmax_score_map_is_softmax_of_the_logits():
    a, b = _tiny(score_map="softmax"), _tiny(score_map="logits")
    s, _, img = _batch()
    torch.testing.assert_close(a(s, img), b(torch.softmax(s, 1), img), rtol=1e-12, atol=0)


def test_unconditional_critic_does_not_read_the_image():
    d = _tiny(in_chans=0, input_norm=False)
    s, _, img = _batch()
    assert torch.equal(d(s, None), d(s, img))


def test_input_norm_matches_float64_moments_and_never_nans():
    norm = RunningInputNorm(3).double()
    x = _rand(2, 3, 5, 7, scale=40) + 100
    norm.update(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(norm.running_mean, flat.mean(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(norm.running_var, flat.var(1, unbiased=True), rtol=1e-11, atol=0)
    y = norm(x).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(y.mean(1), torch.zeros(3, dtype=F64), rtol=0, atol=1e-9)
    x2 = _rand(1, 3, 2, 2, seed=5)
    m0 = norm.running_mean.clone()
    norm.update(x2)  # later batches: BatchNorm's exponential average
    torch.testing.assert_close(norm.running_mean, 0.9 * m0 + 0.1 * x2.mean((0, 2, 3)), rtol=1e-12, atol=0)
    const = RunningInputNorm(2).double()
    const.update(torch.full((1, 2, 1, 1), 7.0, dtype=F64))  # one value per channel: variance 0
    assert torch.isfinite(const(torch.full((1, 2, 3, 3), 7.0, dtype=F64))).all()


def test_self_attention_matches_the_written_out_sum():
    torch.manual_seed(0)
    att = SelfAttention2d(16).double()
    with torch.no_grad():
        att.gamma.fill_(0.7)
    x = _rand(2, 16, 3, 5)
    q, k, v = (conv(x).flatten(2) for conv in (att.query, att.key, att.value))  # (B, C', N)
    ref = torch.empty_like(v)
    for b in range(2):
        for i in range(15):
            logits = torch.stack([q[b, :, i] @ k[b, :, j] for j in range(15)])
            ref[b, :, i] = (torch.softmax(logits, 0)[None] * v[b]).sum(1)
    torch.testing.assert_close(att(x), x + 0.7 * ref.view(2, 16, 3, 5), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        att.gamma.zero_()
    assert torch.equal(att(x), x)  # a new block starts as the identity (SAGAN)


def test_discriminator_compiles_fullgraph():
    d = Discriminator(3, width=2, blocks=2, attention=1)
    q, img = torch.randn(2, 3, 9, 7), torch.rand(2, 3, 9, 7)
    got = torch.compile(d, fullgraph=True, backend="aot_eager")(q, img)
    torch.testing.assert_close(got, d(q, img))


# --- Eq. 3.3 and the gradient penalty ----------------------------------------------------------------

def test_wasserstein_loss_is_the_difference_of_means_as_printed():
    ds, dt = _rand(5, seed=1), _rand(3, seed=2)
    assert wasserstein_critic_loss(ds, dt).item() == pytest.approx(ds.mean().item() - dt.mean().item(), abs=1e-15)
    with pytest.raises(ValueError, match="d_teacher"):
        wasserstein_critic_loss(ds, ds[:0])


def test_penalty_of_a_linear_critic_is_closed_form():
    """D(x | I) = <w, x> + <u, I>: grad_x D = w for every sample, the penalty weight (|w| - 1)^2."""
    w, u = _rand(3, 4, 5, seed=3), _rand(2, 4, 5, seed=4)
    critic = lambda x, img: (x * w).sum((1, 2, 3)) + (img * u).sum((1, 2, 3))
    real, fake, img = _rand(2, 3, 4, 5, seed=5), _rand(2, 3, 4, 5, seed=6), _rand(2, 2, 4, 5, seed=7)
    got = gradient_penalty(critic, real, fake, img, weight=7.0)
    assert got.item() == pytest.approx(7.0 * (w.norm().item() - 1) ** 2, rel=1e-13)


def test_penalty_of_a_nonlinear_critic_matches_autograd_in_the_test():
    """D(x) = sum tanh(w x): the per-sample interpolation (eps from the global RNG) and norms."""
    w = _rand(1, 3, 4, 5, seed=8)
    critic = lambda x, img: torch.tanh(w * x).sum((1, 2, 3))
    real, fake = _rand(3, 3, 4, 5, seed=9, scale=2), _rand(3, 3, 4, 5, seed=10, scale=2)
    torch.manual_seed(11)
    got = gradient_penalty(critic, real, fake, None, weight=10.0)
    torch.manual_seed(11)
    eps = torch.rand(3, 1, 1, 1, dtype=F64)
    x = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x, None).sum(), x)
    closed = w * (1 - torch.tanh(w * x.detach()) ** 2)  # the derivative, by hand
    torch.testing.assert_close(g, closed, rtol=1e-12, atol=1e-14)
    norms = torch.sqrt((closed ** 2).sum((1, 2, 3)))
    assert got.item() == pytest.approx(10.0 * ((norms - 1) ** 2).mean().item(), rel=1e-12)
    assert len(set(eps.flatten().tolist())) == 3  # one eps per sample


def test_penalty_of_a_flat_critic_is_the_weight_with_finite_gradients():
    d = _tiny()
    with torch.no_grad():
        d.head.weight.zero_()  # the critic ignores its input: grad_x D = 0, the norm's kink
    s, t, img = _batch()
    gp = gradient_penalty(d, t, s, img, weight=10.0)
    assert gp.item() == pytest.approx(10.0)
    gp.backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)


def test_gradcheck_penalty():
    d = _tiny(blocks=1, attention=1)
    real, fake, img = _rand(2, 3, 5, 3, seed=12), _rand(2, 3, 5, 3, seed=13), torch.rand(2, 3, 5, 3, dtype=F64)
    d.update_input_stats(torch.cat([real, fake]), torch.cat([img, img]))
    w = d.head.weight.detach().clone()

    def f(real, fake, head_w):
        torch.manual_seed(0)  # the same eps at every evaluation
        critic = lambda x, c: torch.func.functional_call(d, {"head.weight": head_w}, (x, c))
        return gradient_penalty(critic, real, fake, img, weight=3.0)

    assert torch.autograd.gradcheck(f, (real.requires_grad_(), fake.requires_grad_(), w.requires_grad_()))


def test_gradcheck_forward():
    ho = _ho(blocks=1, attention=1)
    s, _, img = _batch(b=2, h=5, w=3)
    img = img / 255
    assert torch.autograd.gradcheck(lambda s, img: ho(s, img), (s.requires_grad_(), img.requires_grad_()))


# --- HolisticDistillation ------------------------------------------------------------------------------

def test_forward_is_the_mean_score_and_no_gradient_reaches_the_critic():
    ho = _ho()
    s, t, img = _batch()
    ho.critic_step(s, t, img)
    s = s.clone().requires_grad_(True)
    value = ho(s, img)
    torch.testing.assert_close(value, ho.critic(s, img).mean(), rtol=0, atol=0)
    (10 * value).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in ho.critic.parameters())
    assert all(p.requires_grad for p in ho.critic.parameters())  # nothing was switched off and left so


def test_structured_objective_subtracts_lambda2_times_the_holistic_term():
    ho = _ho()
    s, t, img = _batch()
    obj = StructuredObjective(pixel_wise=None, pair_wise=None, holistic=ho)
    out = obj(s, t, task_loss=torch.tensor(1.5, dtype=F64), image=img)
    torch.testing.assert_close(out.terms["ho"], ho(s, img))
    torch.testing.assert_close(out.total, 1.5 - 0.1 * ho(s, img))


def test_identical_maps_give_a_zero_wasserstein_term():
    ho = _ho()
    _, t, img = _batch()
    loss, terms = ho.critic_loss(t, t.clone(), img)
    assert terms["ho"].item() == 0.0
    torch.testing.assert_close(loss, terms["gp"])
    assert ho.critic_step(t, t.clone(), img)["wasserstein"] == 0.0


def test_critic_step_lowers_the_critic_loss_on_a_fixed_batch():
    ho = _ho(lr=3e-3, critic_steps=5)
    s, t, img = _batch(b=4)

    def loss():
        torch.manual_seed(0)
        return ho.critic_loss(s, t, img)

    before, w_before = loss()[0].item(), -loss()[1]["ho"].item()
    stats = [ho.critic_step(s, t, img) for _ in range(6)]
    after, w_after = loss()[0].item(), -loss()[1]["ho"].item()
    assert after < before and w_after > w_before  # the critic learns to tell teacher from student
    assert set(stats[-1]) == {"loss", "wasserstein", "gp"} and all(isinstance(v, float) for v in stats[-1].values())


def test_critic_step_detaches_and_refuses_a_non_finite_gradient():
    ho = _ho()
    s, t, img = _batch()
    s.requires_grad_(True)
    ho.critic_step(s * 2, t, img)
    assert s.grad is None  # the student map was detached
    before = {k: v.clone() for k, v in ho.critic.state_dict().items()}
    bad = t.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="no step"):
        ho.critic_step(s, bad, img)
    weights = {k: v for k, v in ho.critic.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, before[k]) for k, v in weights.items())


def test_state_tensors_round_trip_gives_bit_identical_steps():
    a, b = _ho(seed=0), _ho(seed=1)
    s, t, img = _batch()
    torch.manual_seed(3)
    a.critic_step(s, t, img)
    a.critic_step(s, t, img)
    a.optimizer.param_groups[0]["lr"] = 3e-4  # a schedule's change travels too
    data = st_save(a.state_tensors())  # the trainer's safetensors checkpoint
    b.load_state_tensors(st_load(data))
    for ho in (a, b):
        torch.manual_seed(7)
        ho.critic_step(s, t, img)
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys() and any(k.startswith("critic_optim.state.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a(s, img), b(s, img))


def test_state_tensors_before_any_step_load_into_a_fresh_module():
    a, b = _ho(seed=0), _ho(seed=1)
    b.load_state_tensors(a.state_tensors())
    assert all(torch.equal(x, y) for x, y in zip(a.critic.state_dict().values(), b.critic.state_dict().values()))


def _stepped():
    ho = _ho()
    ho.critic_step(*_batch())
    return ho, ho.state_tensors()


@pytest.mark.parametrize("edit,match", [
    (lambda st: st.pop("critic.head.weight"), "'critic.head.weight' is missing"),
    (lambda st: st.__setitem__("critic.head.bias", torch.zeros(2, dtype=F64)), "'critic.head.bias' is"),
    (lambda st: st.__setitem__("critic.extra", torch.zeros(1)), "'critic.extra'"),
    (lambda st: st.pop("critic_optim.state.1.exp_avg"), "'critic_optim.state.1.exp_avg' is missing"),
    (lambda st: st.__setitem__("critic_optim.state.0.exp_avg_sq", torch.zeros(3)), "'critic_optim.state.0.exp_avg_sq'"),
    (lambda st: st.pop("critic_optim.lr"), "'critic_optim.lr' is missing"),
])
def test_load_state_tensors_refuses_a_bad_tensor_by_name(edit, match):
    ho, st = _stepped()
    before = {k: v.clone() for k, v in ho.state_tensors().items()}
    edit(st)
    with pytest.raises(ValueError, match=match):
        ho.load_state_tensors(st)
    after = ho.state_tensors()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing changed


# --- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda ho, s, img: ho(s[:, :2], img), ValueError, "student_map must have num_classes=3"),
    (lambda ho, s, img: ho(s, img[:, :, :-1]), ValueError, "image and student_map must have the same"),
    (lambda ho, s, img: ho(s, img[:, :1]), ValueError, "image must have in_chans=3"),
    (lambda ho, s, img: ho(s[0], img), ValueError, "student_map must be \\(B, C, H, W\\)"),
    (lambda ho, s, img: ho(s, img[0]), ValueError, "image must be \\(B, C, H, W\\)"),
    (lambda ho, s, img: ho(s.long(), img), TypeError, "student_map must be a floating"),
    (lambda ho, s, img: ho(s[:0], img[:0]), ValueError, "student_map is an empty batch"),
    (lambda ho, s, img: ho.critic_step(s, s[:, :2], img), ValueError, "teacher_map must have num_classes"),
    (lambda ho, s, img: ho.critic_loss(s, s[:1], img), ValueError, "image and teacher_map"),
    (lambda ho, s, img: ho.critic.update_input_stats(s[:, :1], img), ValueError, "score_map must have num_classes"),
])
def test_bad_inputs_name_the_argument(call, error, match):
    ho = _ho()
    s, _, img = _batch()
    with pytest.raises(error, match=match):
        call(ho, s, img)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"gp_weight": -1.0}, ValueError, "gp_weight"),
    ({"gp_weight": float("nan")}, ValueError, "gp_weight"),
    ({"critic_steps": 0}, ValueError, "critic_steps"),
    ({"lr": -1e-4}, ValueError, "lr"),
    ({"betas": (0.5,)}, ValueError, "betas"),
    ({"attention": 3, "blocks": 2}, ValueError, "attention must be <= blocks"),
    ({"blocks": 0}, ValueError, "blocks"),
    ({"norm": "batch"}, ValueError, "norm"),
    ({"score_map": "probs"}, ValueError, "score_map"),
    ({"width": 0}, ValueError, "width"),
    ({"critic": torch.nn.Linear(1, 1), "width": 2}, ValueError, "a critic is given"),
    ({"critic": Discriminator(4, width=2)}, ValueError, "num_classes=4"),
])
def test_bad_settings_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        HolisticDistillation(3, **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        HolisticDistillation(0)


def test_penalty_refuses_bad_weights_and_shapes():
    critic = lambda x, c: x.sum((1, 2, 3))
    x = _rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        gradient_penalty(critic, x, x, None, weight=-1.0)
    with pytest.raises(ValueError, match="real and fake must have the same shape"):
        gradient_penalty(critic, x, x[:1], None)
    with pytest.raises(ValueError, match="empty batch"):
        gradient_penalty(critic, x[:0], x[:0], None)


# --- torch.distributed ------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from pyamalgam.losses import HolisticDistillation

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
ho = HolisticDistillation(3, width=2, blocks=2, attention=1, lr=1e-3)
g = torch.Generator().manual_seed(100 + rank)  # every rank its own batch and its own eps
s, t = torch.randn(2, 3, 7, 5, generator=g), torch.randn(2, 3, 7, 5, generator=g)
img = torch.rand(2, 3, 7, 5, generator=g)
torch.manual_seed(rank)
for _ in range(2):
    ho.critic_step(s, t, img)
state = {k: v.double().flatten().tolist() for k, v in ho.state_tensors().items()}
json.dump(state, open(sys.argv[1] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no torch.distributed gloo")
def test_two_ranks_keep_the_same_critic(tmp_path, pyamalgam_env):
    script = tmp_path / "critic.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env={**pyamalgam_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # weights, input statistics and Adam state, although the batches differ
    torch.manual_seed(0)
    fresh = HolisticDistillation(3, width=2, blocks=2, attention=1).state_tensors()
    assert r0["critic.head.weight"] != fresh["critic.head.weight"].double().flatten().tolist()  # it trained

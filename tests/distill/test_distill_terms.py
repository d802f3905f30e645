"""The wiring of the Distiller's objective (thesis Eq. 3.4): each term reads the right tensors,
weights are applied, the holistic term is subtracted after the critic's step, connectors are
built and trained, labels add l_mc only where a batch has them; every term trains."""
import math

import pytest
import torch
import torch.nn.functional as F

from _distill_cases import FakeHolistic, Scenes, loader, nets
from pyamalgam.distill import Distiller
from pyamalgam.losses import channel_wise_loss, pair_wise_loss, pixel_wise_loss
from pyamalgam.nn import Connector

BATCH = {k: v for k, v in torch.utils.data.default_collate([Scenes(4)[i] for i in range(4)]).items()}


def make(terms, **kwargs):
    torch.manual_seed(0)
    teacher, student = nets()
    kwargs.setdefault("progress", False)
    return Distiller(teacher, student, terms=terms, **kwargs)


def _reference(d, batch, ho=None):
    """Eq. 3.4 recomputed from the networks themselves, in eval mode, float64 sums."""
    t, s, x = d.teacher.eval(), d.student.eval(), batch["image"]
    with torch.no_grad():
        zt, zs = t(x), s(x)
        ft, fs = t.forward_until(x, t.num_blocks)[0], s.forward_until(x, s.num_blocks)[0]
        f2t, f2s = t.forward_until(x, 2)[0], s.forward_until(x, 2)[0]
        seg = batch["seg"]
        valid = seg != 255
        mc = F.cross_entropy(zs, seg, ignore_index=255, reduction="sum") / valid.sum()
        terms = {"pi": pixel_wise_loss(zs, zt), "pa": pair_wise_loss(fs, ft),
                 "pa_local": pair_wise_loss(f2s, f2t, radius=1, patch=2),
                 "cwd": channel_wise_loss(fs, ft, 3.0, connector=d.connectors["cwd"]), "mc": mc}
        if ho is not None:
            terms["ho"] = ho(zs, x)
    return {k: float(v) for k, v in terms.items()}


def test_the_total_is_eq_3_4_recomputed_from_the_networks():
    ho = FakeHolistic(5)
    d = make({"pi": 10.0, "pa": {"weight": 7.0}, "pa_local": {"loss": lambda a, b: pair_wise_loss(a, b, 1, 2),
                                                               "weight": 2.5, "tap": ("block", 2)},
              "cwd": 3.0, "ho": {"loss": ho, "weight": 0.3}})
    got = d.losses(BATCH)
    ref = _reference(d, BATCH, ho)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    total = ref["mc"] + 10 * ref["pi"] + 7 * ref["pa"] + 2.5 * ref["pa_local"] + 3 * ref["cwd"] - 0.3 * ref["ho"]
    assert got["total"] == pytest.approx(total, rel=1e-5)
    assert got["labelled"] == 1.0
    assert not ho.calls or all(c[0] == "forward" for c in ho.calls)  # losses() does not step the critic


def test_the_logged_total_of_a_training_run_is_the_weighted_sum_of_its_logged_terms():
    d = make({"pi": 2.0, "pa": 4.0, "cwd": 0.5, "ho": {"loss": FakeHolistic(5), "weight": 0.25}})
    d.fit(loader(), 2)
    m = d.history[-1]["losses"]
    want = m["mc"] + 2 * m["pi"] + 4 * m["pa"] + 0.5 * m["cwd"] - 0.25 * m["ho"]
    assert m["total"] == pytest.approx(want, rel=1e-6)  # a float32 total, float64 means
    assert {"critic/wasserstein", "critic/gp", "labelled"} <= set(m) and m["labelled"] == 1.0


def test_the_critic_steps_first_on_a_detached_map_then_scores_the_student():
    ho = FakeHolistic(5)
    d = make({"ho": ho})
    d.fit(loader(), 1)
    assert ho.calls == [("critic", False), ("forward", True)] * 2  # 2 steps: D, then S with the updated D
    assert d.weights["ho"] == 0.1  # the thesis' lambda_2


def test_the_holistic_term_is_subtracted():
    class Constant(FakeHolistic):
        def forward(self, student_map, image):
            return student_map.new_tensor(2.0)

    base = make({"pi": 1.0}).losses(BATCH)
    with_ho = make({"pi": 1.0, "ho": {"loss": Constant(5), "weight": 0.5}}).losses(BATCH)
    assert with_ho["total"] == pytest.approx(base["total"] - 0.5 * 2.0, rel=1e-6)


def test_weights_scale_their_term_only():
    one, ten = make({"pi": 1.0, "pa": 1.0}).losses(BATCH), make({"pi": 10.0, "pa": 1.0}).losses(BATCH)
    assert ten["pi"] == one["pi"]
    assert ten["total"] - one["total"] == pytest.approx(9 * one["pi"], rel=1e-5)


def test_connector_only_where_the_channel_counts_differ_and_it_trains_with_the_student():
    d = make({"cwd": 3.0})
    conn = d.connectors["cwd"]
    cs, ct = d.student.channels[0], d.teacher.channels[0]  # block N: level 1's channels
    assert isinstance(conn, Connector) and (conn.student_channels, conn.teacher_channels) == (cs, ct) != (ct, ct)
    before = conn.conv.weight.detach().clone()
    d.fit(loader(), 1)
    assert not torch.equal(before, conn.conv.weight)
    torch.manual_seed(0)
    teacher, student = nets(student_width=1 / 8)
    same = Distiller(teacher, student, terms={"cwd": 3.0}, progress=False)
    assert same.connectors == {}


def test_pa_and_cwd_read_the_taps_they_name_and_per_side_taps_differ():
    d = make({"pa": {"tap": {"student": ("block", 5), "teacher": ("module", "blocks.5.convs.1")}},
              "cwd": {"tap": ("block", 2)}})
    got = d.losses(BATCH)  # in eval mode, restoring the student's train mode after
    t, s, x = d.teacher.eval(), d.student.eval(), BATCH["image"]
    with torch.no_grad():
        fs = s.forward_until(x, 5)[0]
        conv = t.blocks["5"].convs  # conv, BatchNorm (the tap), ReLU(inplace=True), ...
        ft = conv[1](conv[0](_before_convs(t, x, 5)))
        cwd = channel_wise_loss(s.forward_until(x, 2)[0], t.forward_until(x, 2)[0], 3.0, d.connectors["cwd"])
    assert got["pa"] == pytest.approx(float(pair_wise_loss(fs, ft)), rel=1e-5)
    assert got["cwd"] == pytest.approx(float(cwd), rel=1e-5)


def _before_convs(net, x, n):
    """The input of block n's convolutions (a decoder block: unpooled block n-1 features)."""
    feat, side = net.forward_until(x, n - 1)
    level = net.blocks[str(n)].level
    return F.max_unpool2d(feat, side[f"pool{level}"], 2, 2)


def test_a_batch_without_labels_trains_on_the_distillation_terms_alone():
    d = make({"pi": 10.0})
    images_only = d.losses({"image": BATCH["image"]})
    assert images_only["mc"] == 0.0 and images_only["labelled"] == 0.0
    assert images_only["total"] == pytest.approx(10 * images_only["pi"], rel=1e-6)
    all_ignored = dict(BATCH, seg=torch.full_like(BATCH["seg"], 255))
    got = d.losses(all_ignored)
    assert got["mc"] == 0.0 and math.isfinite(got["total"])  # a legal batch: never NaN
    assert make({"pi": 1.0}, task_loss=False).losses(BATCH).keys() == {"pi", "total"}
    d.fit(loader(labels=False), 1)
    assert d.history[-1]["losses"]["labelled"] == 0.0


def test_a_custom_task_loss_gets_the_output_and_the_batch():
    seen = []

    def task(output, batch):
        seen.append((tuple(output.shape), sorted(batch)))
        return output.square().mean()

    got = make({"pi": 1.0}, task_loss=task).losses(BATCH)
    assert seen == [((4, 5, 32, 32), ["image", "seg"])] and got["mc"] > 0


def test_a_depth_student_distils_features_and_refuses_pixel_wise_on_its_metres():
    torch.manual_seed(0)
    teacher, student = nets("depth")
    with pytest.raises(ValueError, match=r"terms\['pi'\].*student_logits must be \(B, C, H, W\)"):
        Distiller(teacher, student, terms={"pi": 10.0}, progress=False)
    d = Distiller(teacher, student, terms={"pa": 10.0, "cwd": 3.0}, progress=False)
    depth = torch.rand(4, 32, 32) * 5
    depth[:, :3] = 0  # invalid
    got = d.losses({"image": BATCH["image"], "depth": depth, "mask": depth > 0})
    assert math.isfinite(got["mc"]) and got["mc"] != 0 and got["labelled"] == 1.0


TERMS = {
    "pi": {"pi": 10.0},
    "pa": {"pa": 10.0},
    "pa_local": {"pa": {"weight": 10.0, "radius": 1, "patch": 2, "tap": ("block", 5)}},
    "cwd": {"cwd": 3.0},
    "custom": {"l2": {"loss": lambda s, t: (s - t).square().mean(), "weight": 1.0}},
    "all": {"pi": 10.0, "pa": 10.0, "cwd": 3.0, "ho": "fake"},
}


@pytest.mark.parametrize("name", list(TERMS))
def test_every_term_alone_and_combined_trains(name):
    terms = {k: (FakeHolistic(5) if v == "fake" else v) for k, v in TERMS[name].items()}
    d = make(terms, task_loss=False, optimizer="adam", lr=3e-3, weight_decay=0.0)
    fixed = loader(n=4, batch=4, shuffle=False)  # one batch an epoch: the log holds its last step's terms
    d.fit(fixed, 1)
    before = d.history[-1]["losses"]  # the terms at the initial weights (train mode)
    d.fit(fixed, 12)
    after = d.history[-1]["losses"]
    for k in TERMS[name]:
        if k != "ho":  # the critic moves too: its score is no loss that must fall
            assert after[k] < before[k], (k, before[k], after[k])


def _toy(channels, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(channels, 3, 1)).double()


def test_float64_wiring_on_b1_odd_sizes_and_plain_networks_with_module_taps():
    """Plain nets (no block protocol), B = 1, a 13 x 11 image, a one-channel student feature:
    the Distiller's terms equal the losses called on a manual forward, in float64."""
    teacher, student = _toy(4, 1), _toy(1, 2)
    d = Distiller(teacher, student, terms={"pi": 10.0, "pa": {"radius": 1, "patch": 2}, "cwd": 3.0},
                  taps=("module", "1"), task_loss=False, probe_size=(13, 11), progress=False)
    assert d.connectors["cwd"].student_channels == 1 and d.connectors["cwd"].conv.weight.dtype == torch.float64
    x = torch.rand(1, 3, 13, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = d.losses({"image": x})
    with torch.no_grad():
        ft, fs = torch.tanh(teacher[0](x)), torch.tanh(student[0](x))
        ref = {"pi": pixel_wise_loss(student(x), teacher(x)), "pa": pair_wise_loss(fs, ft, 1, 2),
               "cwd": channel_wise_loss(fs, ft, 3.0, d.connectors["cwd"])}
    for k, v in ref.items():
        assert got[k] == pytest.approx(float(v), rel=1e-12, abs=1e-15), k
    assert got["total"] == pytest.approx(10 * got["pi"] + 10 * got["pa"] + 3 * got["cwd"], rel=1e-12)


def test_gradcheck_of_the_objective_through_the_connector():
    teacher, student = _toy(4, 1), _toy(2, 2)
    d = Distiller(teacher, student, terms={"cwd": 3.0, "pa": 1.0}, taps=("module", "1"), task_loss=False,
                  probe_size=(5, 7), progress=False)
    x = torch.rand(1, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight = d.connectors["cwd"].conv.weight.detach().clone().requires_grad_(True)
    name = "losses.cwd.connector.conv.weight"
    with torch.no_grad():
        t_out, t_feats = d.teacher_taps.run(x)

    def total(w):
        params = {name: w}
        _, terms = torch.func.functional_call(d.step_module, params, (x, t_out, t_feats))
        return 3.0 * terms["cwd"] + terms["pa"]

    assert torch.autograd.gradcheck(total, (weight,), eps=1e-6, atol=1e-7)


def test_channels_last_gives_the_same_objective():
    plain, cl = make({"pi": 10.0, "pa": 10.0, "cwd": 3.0}), make({"pi": 10.0, "pa": 10.0, "cwd": 3.0},
                                                                  channels_last=True)
    a, b = plain.losses(BATCH), cl.losses(BATCH)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_no_term_trains_the_student_on_its_labels_without_running_the_teacher():
    d = make({})
    calls = []
    d.teacher.head.register_forward_hook(lambda *a: calls.append(1))
    got = d.losses(BATCH)
    assert set(got) == {"mc", "labelled", "total"} and got["total"] == got["mc"] > 0
    d.fit(loader(), 1)
    assert calls == [] and d.history[-1]["losses"]["labelled"] == 1.0
    with pytest.raises(ValueError, match="a batch without labels, and no distillation term"):
        d.losses({"image": BATCH["image"]})

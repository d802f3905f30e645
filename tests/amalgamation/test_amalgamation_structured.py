"""Structured-distillation terms inside the Amalgamator (issue 12): off by default and then bit
for bit the paper's method; pi / pa / cwd added to Eq. 6 / 8 and (pi) to the fine-tune, checked
against float64 formulas; Eq. 7's tables keep the task losses alone."""
import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import state_digest, tiny_loader, tiny_run, tiny_teachers
from pyamalgam.amalgamation import BlockStep
from pyamalgam.engine import CorruptFileError
from pyamalgam.ops import reference

ZERO = {"pi": 0.0, "pa": 0.0, "cwd": 0.0}


def _fingerprint(am):
    return (state_digest(am.target_net), state_digest(am.codings), am.loss_table, am.branch_points)


@pytest.mark.parametrize("objective", ["prediction", "feature"])
def test_default_off_is_the_paper_method_bit_for_bit(objective):
    plain = tiny_run(objective=objective)
    assert _fingerprint(tiny_run(objective=objective, terms=None)) == _fingerprint(plain)
    assert "terms" not in plain._config()  # checkpoints of the paper's method are unchanged too
    # every new code path runs (soft targets, block features, the weighted terms), weighted 0
    zero = tiny_run(objective=objective, terms=ZERO)
    assert _fingerprint(zero) == _fingerprint(plain)
    logged = zero.history[0]["train_losses"]
    assert {"pa/seg", "pa/depth", "cwd/seg", "cwd/depth"} <= set(logged)
    assert ("pi/seg" in logged) == (objective == "prediction")  # Eq. 5 runs no teacher suffix


def _softmax_kl64(ps, pt):
    """KL(softmax(ps) || softmax(pt)) per pixel, mean over pixels, in float64 (Eq. 3.1, T = 1)."""
    ls, lt = torch.log_softmax(ps.double(), 1), torch.log_softmax(pt.double(), 1)
    return (ls.exp() * (ls - lt)).sum(1).mean()


def test_block_terms_against_float64_formulas(teachers, images):
    am = Amalgamator(teachers, terms={"pi": 2.0, "pa": 3.0, "cwd": {"weight": 0.5, "temperature": 2.0}},
                     progress=False)
    n = 2
    step = BlockStep(am.student.block(n), am.codings[str(n)])
    loss, terms = am._block_loss(n, step, images, eq7=False)
    with torch.no_grad():
        prev, side = am.student.forward_until(images, n - 1)
        projected, side = step(prev, side)
        want = {}
        for key, t in am.teachers.items():
            own, _ = t.forward_until(images, n)
            want[f"pa/{key}"] = reference.pairwise_affinity_loss(projected[key].double(), own.double())
            want[f"cwd/{key}"] = reference.channel_wise_loss(projected[key].double(), own.double(), 2.0)
        seg = am.teachers["seg"]
        want["pi/seg"] = _softmax_kl64(seg.forward_from(projected["seg"], n, side), seg(images))  # soft, not arg-max
    assert set(terms) == {"seg", "depth", *want}
    for k, v in want.items():
        torch.testing.assert_close(terms[k].double(), v, rtol=1e-4, atol=1e-6, msg=k)
    task = terms["seg"] + terms["depth"]
    extra = 2.0 * terms["pi/seg"] + 3.0 * (terms["pa/seg"] + terms["pa/depth"]) + 0.5 * (
        terms["cwd/seg"] + terms["cwd/depth"])
    torch.testing.assert_close(loss, task + extra)
    _, probe = am._block_loss(n, step, images, eq7=True)  # what Eq. 7 records: the task losses only
    assert set(probe) == {"seg", "depth"}


def test_terms_change_training_but_not_what_eq7_compares():
    plain, pi = tiny_run(), tiny_run(terms={"pi": 10})
    assert state_digest(pi.target_net) != state_digest(plain.target_net)
    assert set(pi.loss_table) == {"seg", "depth"} and pi.feature_table == {}
    blocks = [r for r in pi.history if r["event"] == "block"]
    assert all("pi/seg" in r["train_losses"] and set(r["losses"]) == {"seg", "depth"} for r in blocks)
    finetune = next(r for r in pi.history if r["event"] == "finetune")
    assert set(finetune["losses"]) == {"seg", "depth", "pi/seg"}  # pa / cwd: block phase only
    assert pi._config()["terms"] == {"pi": {"weight": 10.0}}


def test_the_target_cache_holds_the_soft_targets_too():
    terms = {"pi": {"weight": 1.0, "temperature": 2.0}}
    plain = tiny_run(terms=terms, loader=tiny_loader(8, shuffle=False))
    cached = Amalgamator(tiny_teachers(), terms=terms, cache_targets=1 << 24, progress=False)
    assert cached.precompute_targets(tiny_loader(8, shuffle=False)) == 8
    torch.manual_seed(0)
    cached.fit(tiny_loader(8, shuffle=False), 1)
    cached.branch_out()
    cached.finetune(tiny_loader(8, shuffle=False), 1)
    assert cached.target_cache.hits > 0
    assert _fingerprint(cached) == _fingerprint(plain)


def test_an_online_teacher_past_its_branch_point_gets_the_mean_over_its_streams(images):
    am2 = Amalgamator(tiny_teachers("segmentation", "depth"), progress=False)
    am2.branch_out(points={"seg": 4, "depth": 5})
    am = Amalgamator({"tn2": am2.target_net, **tiny_teachers("normals", seed=3)}, terms={"pa": 1, "pi": 1},
                     progress=False)
    n = 5  # tn2's streams have left its trunk (seg at 4)
    step = BlockStep(am.student.block(n), am.codings[str(n)])
    _, terms = am._block_loss(n, step, images, eq7=False)
    with torch.no_grad():
        prev, side = am.student.forward_until(images, n - 1)
        projected, _ = step(prev, side)
        streams, _ = am.teachers["tn2"].forward_until(images, n)
    assert isinstance(streams, dict) and len(streams) == 2
    want = torch.stack([reference.pairwise_affinity_loss(projected["tn2"].double(), s.double())
                        for s in streams.values()]).mean()
    torch.testing.assert_close(terms["pa/tn2"].double(), want, rtol=1e-4, atol=1e-6)
    assert "pi/seg" in terms and "pi/normal" not in terms  # the TargetNet teacher's seg output


@pytest.mark.parametrize("terms, exc, needle", [
    ({"ho": 0.1}, ValueError, "needs a critic"),
    ({"pix": 1}, ValueError, "unknown term 'pix'"),
    ({"pi": -1}, ValueError, "finite number >= 0"),
    ({"pi": {"weight": 1, "tap": ("block", 3)}}, ValueError, "takes no 'tap'"),
    ({"pa": {"radius": -1}}, ValueError, "radius"),
    ({"pi": {"temprature": 2}}, ValueError, r"unknown option\(s\) \['temprature'\]"),
    ({"pi": lambda s, t: s.sum()}, ValueError, "a loss object is the Distiller's"),
    (["pi"], TypeError, "terms must be a mapping"),
])
def test_bad_terms_are_refused_naming_the_entry(teachers, terms, exc, needle):
    with pytest.raises(exc, match=needle):
        Amalgamator(teachers, terms=terms, progress=False)


def test_pi_without_a_segmentation_output_is_refused():
    with pytest.raises(ValueError, match=r"terms\['pi'\].*only segmentation outputs.*\['depth', 'normal'\]"):
        Amalgamator(tiny_teachers("depth", "normals"), terms={"pi": 1}, progress=False)


def test_a_resume_with_other_terms_is_refused(tmp_path):
    tiny_run(tmp_path, terms={"pa": 1})
    with pytest.raises(CorruptFileError, match="different setup"):
        tiny_run(tmp_path)
    with pytest.raises(CorruptFileError, match="different setup"):
        tiny_run(tmp_path, terms={"pa": 2})
    tiny_run(tmp_path, terms={"pa": 1})  # the same terms resume

"""Block-n objective (Eq. 5, 6) and what each step computes (no wasted graph, no teacher update)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pyamalgam import Amalgamator
from pyamalgam.amalgamation import feature_losses, frozen_pass, prediction_losses, weighted_sum
from pyamalgam._testing import tiny_net as tiny


def loader(n=8, batch=4):
    return DataLoader(TensorDataset(torch.rand(n, 3, 32, 40, generator=torch.Generator().manual_seed(4))), batch_size=batch)


@pytest.mark.parametrize("n", range(1, 7))
def test_eq6_with_the_teachers_own_features_is_zero_for_depth_and_self_cross_entropy_for_seg(teachers, images, n):
    outputs = {key: {key: t.task} for key, t in teachers.items()}
    with torch.no_grad():
        for key, t in teachers.items():
            prediction = t(images)
            features, side = t.forward_until(images, n)
            losses = prediction_losses({key: t}, outputs, {key: features}, n, side, {key: t.task.target(prediction)})
            if key == "depth":
                assert losses["depth"].item() == 0.0  # D-hat = D exactly, so Eq. 3 vanishes
            else:
                assert torch.equal(losses["seg"], F.cross_entropy(prediction, prediction.argmax(1)))


def test_eq5_terms_and_weighted_sum(teachers, images):
    student = tiny("segmentation", 1)
    outputs = {key: {key: t.task} for key, t in teachers.items()}
    frozen = frozen_pass(student, teachers, outputs, images, 3, targets=True, features=True)
    own = {key: frozen.features[key] for key in teachers}
    assert all(v.item() == 0.0 for v in feature_losses(own, frozen.features).values())
    shifted = {key: f + 1 for key, f in own.items()}
    terms = feature_losses(shifted, frozen.features)
    assert all(v.item() == pytest.approx(1.0) for v in terms.values())
    assert weighted_sum(terms, {"seg": 2.0, "depth": 0.5}).item() == pytest.approx(2.5)
    # the Eq. 5 pass reuses each teacher's run to block n for its prediction: same targets as teacher(x)
    assert torch.equal(frozen.targets["seg"], teachers["seg"](images).argmax(1))
    assert torch.equal(frozen.targets["depth"], teachers["depth"](images))


def test_each_teacher_predicts_once_per_batch_and_the_frozen_prefix_builds_no_graph(teachers, monkeypatch):
    calls = {key: 0 for key in teachers}
    for key, t in teachers.items():
        original = t.forward

        def counted(x, key=key, original=original):
            calls[key] += 1
            return original(x)

        monkeypatch.setattr(t, "forward", counted)
    am = Amalgamator(teachers, progress=False)
    seen = []
    training = {}

    def hook(module, args, out, i):
        if torch.is_grad_enabled():  # training steps; the probe of Eq. 7 runs under no_grad
            seen.append((training["n"], i, out.requires_grad))

    for i, block in am.student.blocks.items():
        block.register_forward_hook(lambda m, a, out, i=int(i): hook(m, a, out, i))
    original_train_block = am._train_block

    def train_block(n, *args):
        training["n"] = n
        return original_train_block(n, *args)

    monkeypatch.setattr(am, "_train_block", train_block)
    am.fit(loader(), 1, max_steps_per_block=2)
    # one prediction per batch: 6 blocks x (2 steps + the 2 probe batches of Eq. 7's final loss)
    assert calls == {"seg": 24, "depth": 24}
    assert seen
    for n, i, requires_grad in seen:
        assert i <= n and requires_grad == (i == n), (n, i)


def test_teachers_get_no_gradient_but_pass_it_to_block_n_and_its_codings(teachers):
    before = {key: {k: v.clone() for k, v in t.state_dict().items()} for key, t in teachers.items()}
    am = Amalgamator(teachers, progress=False, lr=0.1)
    student0 = {k: v.clone() for k, v in am.student.state_dict().items()}
    codings0 = {k: v.clone() for k, v in am.codings.state_dict().items()}
    am._train_block(2, loader(), 1, None, [next(iter(loader()))])
    for key, t in teachers.items():
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        assert all(torch.equal(v, before[key][k]) for k, v in t.state_dict().items())
    changed = {k for k, v in am.student.state_dict().items() if not torch.equal(v, student0[k])}
    assert changed and all(k.startswith("blocks.2.") for k in changed)
    changed = {k for k, v in am.codings.state_dict().items() if not torch.equal(v, codings0[k])}
    assert {k.rsplit(".", 1)[0] for k in changed} == {"2.seg", "2.depth"}
    assert 2 in am.loss_table["seg"] and 2 in am.loss_table["depth"]


def test_feature_objective_records_feature_and_task_losses(teachers):
    am = Amalgamator(teachers, objective="eq5", progress=False)
    am.fit(loader(), 1, max_steps_per_block=1)
    assert set(am.feature_table) == {"seg", "depth"} and all(len(v) == 6 for v in am.feature_table.values())
    assert all(len(v) == 6 for v in am.loss_table.values())  # so Eq. 7 still compares task losses

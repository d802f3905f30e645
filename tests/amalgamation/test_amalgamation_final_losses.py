"""Eq. 7's final block losses L_t^n, Step 1's initialisation, near-identity codings, target precompute."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_net as tiny
from pyamalgam.nn import ChannelCoding


def loader(n=12, batch=4, shuffle=True, seed=4):
    images = torch.rand(n, 3, 32, 40, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images), batch_size=batch, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _loss_of_trained_block(am, n, images):
    """Independently: student blocks 1..n in eval mode, block n's codings, each teacher's suffix."""
    am.student.eval()
    feats, side = am.student.forward_until(images, n)
    losses = {}
    for key, teacher in am.teachers.items():
        target = teacher.task.target(teacher(images))
        prediction = teacher.forward_from(am.codings[str(n)][key](feats), n, side)
        losses[key] = float(teacher.task.loss(prediction, target))
    return losses


def test_final_loss_is_the_trained_block_on_fixed_probe_images_not_the_training_mean(teachers):
    data = loader()
    # lr 0.05: the loss moves a lot during the 6 steps of a block, so the mean over the training
    # steps (what was recorded before) is far from the loss of the trained block in eval mode
    am = Amalgamator(teachers, lr=0.05, progress=False, log_dir=None)
    am.fit(data, 2, final_loss_images=8)
    probe = data.dataset.tensors[0][[0, 1, 3, 4, 6, 7, 9, 10]]  # 8 of 12 images, evenly spaced
    for n in range(1, am.num_blocks + 1):
        expected = _loss_of_trained_block(am, n, probe)
        for name in ("seg", "depth"):
            assert am.loss_table[name][n] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (n, name)
    blocks = [r for r in am.history if r["event"] == "block"]
    gaps = [abs(r["train_losses"][name] - r["losses"][name]) for r in blocks for name in ("seg", "depth")]
    assert min(gaps) > 1e-3 and max(gaps) > 0.05  # so the recomputation above tells the two apart


def test_probe_images_do_not_move_the_loaders_generator_or_the_global_rng(teachers):
    from pyamalgam.amalgamation.amalgamator import _fixed_batches

    data = loader()
    am = Amalgamator(teachers, progress=False)  # draws the codings' initialisation
    before = data.generator.get_state().clone(), torch.get_rng_state().clone()

    batches = _fixed_batches(data, 6, None)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), data.dataset.tensors[0][[0, 2, 4, 6, 8, 10]])
    assert torch.equal(data.generator.get_state(), before[0]) and torch.equal(torch.get_rng_state(), before[1])
    with pytest.raises(ValueError, match="final_loss_images must be a positive int"):
        am.fit(data, 1, final_loss_images=0)


def test_a_fixed_probe_loader_can_be_given(teachers):
    probe = loader(n=4, shuffle=False, seed=9)
    am = Amalgamator(teachers, progress=False)
    am.fit(loader(), 1, max_steps_per_block=1, final_loss_loader=probe)
    expected = _loss_of_trained_block(am, 2, probe.dataset.tensors[0])
    assert am.loss_table["depth"][2] == pytest.approx(expected["depth"], rel=1e-4, abs=1e-6)


def test_fit_defaults_to_two_epochs_per_block_as_in_section_6_1(teachers):
    am = Amalgamator(teachers, progress=False)
    am.fit(loader(n=8), final_loss_images=4)
    assert all(r["steps"] == 2 * 2 for r in am.history if r["event"] == "block")


def test_online_student_starts_from_the_targetnet2_trunk_not_from_normnet(teachers):
    am2 = Amalgamator(teachers, progress=False)
    am2.fit(loader(), 1, max_steps_per_block=1)
    am2.branch_out({"seg": 5, "depth": 4})
    net2 = am2.finetune(loader(), 1, max_steps=1)
    am3 = Amalgamator({"t2": net2, "normal": tiny("normals", 3)}, progress=False)
    student = am3.student.blocks
    for i in range(1, 6):  # the trunk (blocks 1..5), then seg's stream, the one that branches out last
        source = net2.trunk[str(i)]
        assert all(torch.equal(a, b) for a, b in zip(student[str(i)].state_dict().values(), source.state_dict().values()))
    tail = net2.branches["seg"].tail.blocks["6"]
    assert all(torch.equal(a, b) for a, b in zip(student["6"].state_dict().values(), tail.state_dict().values()))
    assert am3.student.head is None


def test_codings_start_near_the_identity_by_default_and_can_use_linear_init(teachers):
    x = torch.randn(2, 4, 5, 3)
    coding = ChannelCoding(4, gate=0.95)
    torch.testing.assert_close(coding(x), 0.95 * x)
    am = Amalgamator(teachers, progress=False)
    assert all(torch.equal(c.w2, torch.zeros_like(c.w2)) for block in am.codings.values() for c in block.values())
    am = Amalgamator(teachers, progress=False, coding_gate=None)
    assert all(c.w2.abs().sum() > 0 for block in am.codings.values() for c in block.values())
    for bad in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="coding_gate must be a number in"):
            Amalgamator(teachers, progress=False, coding_gate=bad)
    with pytest.raises(ValueError, match=r"gate must be in \(0, 1\)"):
        ChannelCoding(4, gate=2.0)


def test_precomputed_targets_serve_every_step(teachers):
    am = Amalgamator(teachers, progress=False, cache_targets=2**24)
    assert am.precompute_targets(loader(shuffle=False)) == 12
    misses = am.target_cache.misses
    am.fit(loader(), 1, max_steps_per_block=2, final_loss_images=8)
    assert am.target_cache.misses == misses  # blocks and probes all hit
    with pytest.raises(RuntimeError, match="needs a target cache"):
        Amalgamator(teachers, progress=False).precompute_targets(loader())


def test_adam_is_an_option_and_a_wrong_optimizer_is_refused(teachers):
    am = Amalgamator(teachers, progress=False, optimizer="adam", lr=1e-3)
    am.fit(loader(n=8), 1, max_steps_per_block=1, final_loss_images=4)
    assert am._config()["optimizer"] == "adam"
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Amalgamator(teachers, progress=False, optimizer="rmsprop")

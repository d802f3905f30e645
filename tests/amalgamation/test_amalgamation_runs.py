"""End-to-end runs on tiny random teachers: two teachers, offline (Eq. 8) and online (Eq. 9) three."""
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam import Amalgamator, TargetNet
from pyamalgam._testing import tiny_net as tiny
from pyamalgam.models import count_parameters, unet_vgg


def loader(n=8, batch=4, shuffle=False):
    images = torch.rand(n, 3, 32, 40, generator=torch.Generator().manual_seed(4))
    # dict batches like pyamalgam.data yields; labels are present but must never be read
    data = [{"image": im, "seg": torch.zeros(32, 40, dtype=torch.long)} for im in images]
    return DataLoader(data, batch_size=batch, shuffle=shuffle)


@pytest.fixture(scope="module")
def target2():
    """A trained TargetNet-2 (seg + depth), reused as a teacher by the online scheme."""
    am = Amalgamator({"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}, progress=False)
    am.fit(loader(), 1)
    am.branch_out()
    return am.finetune(loader(), 1), am


def test_two_teacher_run_records_every_block_and_logs(tmp_path, target2):
    net, am = target2
    assert all(sorted(row) == [1, 2, 3, 4, 5, 6] for row in am.loss_table.values())
    assert set(am.branch_points) == {"seg", "depth"}
    assert all(4 <= p <= 6 for p in am.branch_points.values())
    assert [r["event"] for r in am.history] == ["block"] * 6 + ["branch_out", "finetune"]
    report = am.parameter_report()
    assert report["target_net"] == count_parameters(net) < report["teachers_total"]
    out = net.eval()(torch.rand(1, 3, 32, 40))
    assert out["seg"].shape == (1, 5, 32, 40) and out["depth"].shape == (1, 32, 40)


def test_log_is_json_lines_per_block(tmp_path):
    am = Amalgamator({"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}, progress=False, log_dir=tmp_path)
    am.fit(loader(), 1, max_steps_per_block=1)
    records = [json.loads(line) for line in (tmp_path / "amalgamation.jsonl").read_text().splitlines()]
    assert [r["block"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]["losses"]) == {"seg", "depth"} and records[0]["steps"] == 1


def test_offline_three_teachers_eq8():
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2), "normal": tiny("normals", 3)}
    am = Amalgamator(teachers, weights={"normal": 2.0}, progress=False)
    am.fit(loader(), 1, max_steps_per_block=1)
    assert set(am.loss_table) == {"seg", "depth", "normal"}
    assert all(set(c) == {"seg", "depth", "normal"} for c in am.codings.values())  # K codings per block
    am.branch_out()
    net = am.finetune(loader(), 1, max_steps=1)
    out = net.eval()(torch.rand(2, 3, 32, 40))
    assert out["normal"].shape == (2, 3, 32, 40)
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 40))


def test_online_three_teachers_eq9(target2):
    net2, am2 = target2
    teachers = {"t2": net2, "normal": tiny("normals", 3)}
    frozen = {key: {k: v.clone() for k, v in t.state_dict().items()} for key, t in teachers.items()}
    am = Amalgamator(teachers, weights={"t2": 0.5}, progress=False)
    assert am._weights == {"seg": 0.5, "depth": 0.5, "normal": 1.0}  # lambda_2 * Eq. 6's lambdas
    assert set(am.codings["1"]) == {"t2", "normal"}  # the U-channel and the M-channel coding
    student0 = {k: v.clone() for k, v in am.student.state_dict().items()}
    codings0 = {k: v.clone() for k, v in am.codings.state_dict().items()}
    am.fit(loader(), 1, max_steps_per_block=2)
    assert set(am.loss_table) == {"seg", "depth", "normal"}
    for key, t in teachers.items():  # TargetNet-2 and the new teacher never learn, nor get gradients
        assert all(p.grad is None and not p.requires_grad for p in t.parameters()), key
        assert all(torch.equal(v, frozen[key][k]) for k, v in t.state_dict().items()), key
    # only the new student and its codings (U- and M-channel, every block) learn
    assert all(not torch.equal(am.student.blocks[str(n)].convs[0].weight, student0[f"blocks.{n}.convs.0.weight"])
               for n in range(1, 7))
    assert [(n, key) for n in range(1, 7) for key in teachers
            if all(torch.equal(v, codings0[f"{n}.{key}.{w}"]) for w, v in am.codings[str(n)][key].state_dict().items())] == []
    points = am.branch_out()
    net3 = am.finetune(loader(), 1, max_steps=1)
    assert isinstance(net3, TargetNet) and set(points) == {"t2", "normal"}
    out = net3.eval()(torch.rand(1, 3, 32, 40))
    assert set(out) == {"seg", "depth", "normal"}
    assert am.parameter_report()["teachers"]["t2"] == count_parameters(net2)


def test_unet_teachers_carry_skips():
    teachers = {"seg": tiny("segmentation", 1, unet_vgg), "depth": tiny("depth", 2, unet_vgg)}
    am = Amalgamator(teachers, progress=False)
    am.fit(loader(), 1, max_steps_per_block=1)
    am.branch_out(points={"seg": 4, "depth": 5})
    out = am.finetune(loader(), 1, max_steps=1).eval()(torch.rand(1, 3, 32, 40))
    assert out["depth"].shape == (1, 32, 40)


def test_a_user_task_plugs_in_without_touching_the_trainer():
    l1 = lambda prediction, target: (prediction - target).abs().mean()  # noqa: E731
    teachers = {"seg": tiny("segmentation", 1), "albedo": tiny("depth", 2)}
    am = Amalgamator(teachers, tasks={"albedo": l1}, progress=False)
    am.fit(loader(), 1, max_steps_per_block=1)
    assert set(am.loss_table) == {"seg", "albedo"} and am.loss_table["albedo"][1] > 0


@pytest.mark.parametrize("init", ["random", "depth"])
def test_student_initialisation(init):
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}
    am = Amalgamator(teachers, init=init, progress=False)
    same = torch.equal(am.student.blocks["1"].convs[0].weight, teachers["depth"].blocks["1"].convs[0].weight)
    assert same == (init == "depth")
    assert am.student.head is None and not any(p.requires_grad for p in am.student.parameters())


def test_default_initialisation_copies_the_first_teacher():
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}
    am = Amalgamator(teachers, progress=False)
    assert all(torch.equal(v, teachers["seg"].blocks.state_dict()[k]) for k, v in am.student.blocks.state_dict().items())


def test_bf16_autocast_and_channels_last_run_on_cpu():
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}
    am = Amalgamator(teachers, amp=True, channels_last=True, progress=False)
    am.fit(loader(), 1, max_steps_per_block=1)
    am.branch_out()
    out = am.finetune(loader(), 1, max_steps=1).eval()(torch.rand(1, 3, 32, 40))
    assert out["depth"].dtype == torch.float32 and torch.isfinite(out["depth"]).all()


def test_progress_bars_only_when_asked(capsys):
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}
    Amalgamator(teachers, progress=True).fit(loader(), 1, max_steps_per_block=1)
    assert re.search(r"block 1/6.*block 6/6", capsys.readouterr().err)
    Amalgamator(teachers, progress=False).fit(loader(), 1, max_steps_per_block=1)
    assert capsys.readouterr().err == ""


def test_tensorboard_gets_the_block_losses_when_installed(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    am = Amalgamator({"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}, progress=False, log_dir=tmp_path)
    am.fit(loader(), 1, max_steps_per_block=1)
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_target_cache_gives_the_same_run_with_one_teacher_pass_per_image():
    from pyamalgam._testing import state_digest, tiny_run

    plain, cached = tiny_run(None), tiny_run(None, cache_targets=2**24)
    assert state_digest(cached.target_net) == state_digest(plain.target_net)
    assert cached.loss_table == plain.loss_table
    cache = cached.target_cache
    # 3 batches, then every step hits: blocks 2..6 and the fine-tune, and the 3 probe batches of
    # Eq. 7's final losses after each of the 6 blocks
    assert len(cache) == 12 and cache.misses == 3 and cache.hits == 6 * 3 + 6 * 3


def test_target_cache_stops_storing_at_its_budget():
    teachers = {"seg": tiny("segmentation", 1), "depth": tiny("depth", 2)}
    per_image = 32 * 40 * 8 + 32 * 40 * 4  # int64 labels + float32 depth
    am = Amalgamator(teachers, progress=False, cache_targets=5 * per_image)
    am.fit(loader(), 1)  # 2 batches of 4 images: the second batch is stored only in part
    assert len(am.target_cache) == 5 and am.target_cache.bytes == 5 * per_image
    # the first batch hits in blocks 2..6 and in every block's probe (the same images); the second always misses
    assert am.target_cache.hits == 5 + 6

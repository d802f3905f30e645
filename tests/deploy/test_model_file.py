"""TargetNet.save / pyamalgam.deploy.load: one self-describing file, bit-identical round trips,
and every kind of bad file refused with an error that names it."""

import pytest
import torch
from safetensors.torch import save_file

from pyamalgam import Amalgamator
from pyamalgam._testing import rewrite_model_record, tiny_net
from pyamalgam.deploy import load, load_record, save_model
from pyamalgam.engine import CorruptFileError, save_checkpoint
from pyamalgam.losses import LossTask
from pyamalgam.models import SegmentationHead, segnet_vgg, serialize
from pyamalgam.teachers import TeacherRecord, build_teacher, save_teacher


def _same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    ya, yb = (ya, yb) if isinstance(ya, dict) else ({"y": ya}, {"y": yb})
    assert list(ya) == list(yb)
    for k in ya:
        assert torch.equal(ya[k], yb[k]), k


def test_target_net_round_trip_is_bit_identical(target_net, images, tmp_path):
    path = target_net.save(tmp_path / "net.safetensors", resolution=(32, 32), extra={"points": target_net.points})
    loaded, record = load_record(path)
    assert type(loaded).__name__ == "TargetNet" and not loaded.training
    assert loaded.points == target_net.points and loaded.task_weights == target_net.task_weights
    assert {k: type(v) for k, v in loaded.tasks.items()} == {k: type(v) for k, v in target_net.tasks.items()}
    assert record["resolution"] == [32, 32] and record["extra"] == {"points": target_net.points}
    _same_outputs(target_net, loaded, images)
    odd = torch.rand(1, 3, 8, 20)  # B=1, another size: the architecture, not the traced shape
    _same_outputs(target_net, loaded, odd)


@pytest.mark.parametrize("task, factory, kwargs", [("segmentation", "segnet_vgg", {}),
                                                   ("depth", "segnet_vgg", {"max_depth": 7.3}),
                                                   ("normals", "unet_vgg", {"depth": 2})])
def test_teacher_round_trip(task, factory, kwargs, images, tmp_path):
    net = tiny_net(task, factory=factory, **kwargs)
    loaded = load(save_model(net, tmp_path / "t.safetensors"))
    assert type(loaded) is type(net) and repr(loaded) == repr(net)
    _same_outputs(net, loaded, images)


def test_nested_target_net_of_eq9_round_trips(make_target_net, images, tmp_path):
    # TargetNet-2 teaching TargetNet-3 online (Eq. 9): a branch whose tail is itself a TargetNet
    t2 = make_target_net(tasks=("segmentation", "depth"), points={"seg": 4, "depth": 3})
    am = Amalgamator({"t2": t2, "normal": tiny_net("normals", seed=7, depth=2)}, progress=False)
    am.branch_out(points={"t2": 3, "normal": 4})
    net = am.target_net.eval()
    assert serialize.describe(net)["branches"]["t2"]["tail"]["type"] == "target_net"
    _same_outputs(net, load(net.save(tmp_path / "t3.safetensors")), images)


def test_float64_and_device_argument(images, tmp_path):
    net = tiny_net("depth", depth=2).double()
    loaded = load(save_model(net, tmp_path / "d.safetensors"), device="cpu")
    assert next(loaded.parameters()).dtype == torch.float64
    _same_outputs(net, loaded, images.double())


def test_teacher_checkpoints_of_train_teacher_load_too(images, tmp_path):
    net = build_teacher("seg", width=1 / 16, depth=2, num_classes=4).eval()
    weights = save_teacher(net, tmp_path / "seg", TeacherRecord(config={"task": "seg", "width": 1 / 16, "depth": 2,
                                                                        "num_classes": 4}))
    for path in (weights, weights.with_suffix(".json")):
        _same_outputs(net, load(path), images)


def test_save_is_atomic_and_refuses_what_it_cannot_describe(tmp_path):
    path = save_model(tiny_net("depth", depth=2), tmp_path / "m.safetensors")
    before = path.read_bytes()
    custom = segnet_vgg("segmentation", width=1 / 16, depth=2, head=torch.nn.Conv2d(4, 5, 1))
    with pytest.raises(ValueError, match="cannot describe the head, a Conv2d"):
        save_model(custom, path)
    loss_task = segnet_vgg(LossTask(lambda p, t: (p - t).abs().mean(), "edges"), width=1 / 16, depth=2,
                           head=SegmentationHead(4, 5))
    with pytest.raises(ValueError, match="a loss callable is code"):
        save_model(loss_task, path)
    replaced = tiny_net("segmentation", depth=2)
    replaced.blocks["2"].convs[1] = torch.nn.BatchNorm2d(8, eps=1e-3)  # a stock slot, another setting
    with pytest.raises(ValueError, match="block 2"):
        save_model(replaced, path)
    with pytest.raises(ValueError, match="cannot describe a Linear"):
        save_model(torch.nn.Linear(2, 2), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ------------------------------------------------------------------------------ bad files

@pytest.fixture(scope="module")
def saved(make_target_net, tmp_path_factory):
    net = make_target_net(tasks=("segmentation", "depth"), points={"seg": 4, "depth": 3})
    return net.save(tmp_path_factory.mktemp("model") / "net.safetensors")


def test_flipped_bit_in_the_weights_is_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256 digest: the file is corrupted") as e:
        load(tmp_path / "flip.safetensors")
    assert e.value.path == tmp_path / "flip.safetensors"


@pytest.mark.parametrize("cut", [0, 5, 200, -100])
def test_truncated_or_empty_file_is_refused(saved, tmp_path, cut):
    data = saved.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])  # a negative cut drops the last bytes of the weights
    with pytest.raises(CorruptFileError, match=str(path)):
        load(path)


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CorruptFileError, match="without pyamalgam metadata"):
        load(plain)
    ckpt = save_checkpoint(tmp_path / "ckpt.safetensors", {"w": torch.zeros(2)}, {"phase": "fit"})
    with pytest.raises(CorruptFileError, match="training checkpoint"):
        load(ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load(junk)
    with pytest.raises(FileNotFoundError, match="no model file"):
        load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.update(version=2), "version 2"),
    (lambda r: r.update(format="other"), "not a pyamalgam-model record"),
    (lambda r: r.update(kind="teacher"), "kind 'teacher'"),
    (lambda r: r["architecture"]["trunk"]["1"].update(in_channels="3"), "in_channels"),
    (lambda r: r["architecture"]["trunk"]["1"].update(out_channels=1000), "builds no network that runs: RuntimeError"),
    (lambda r: r["architecture"].update(hack=1), "unknown field 'hack'"),
    (lambda r: r["architecture"]["trunk"].pop("2"), "builds no network that runs"),
    (lambda r: r["architecture"]["trunk"].update({"9": r["architecture"]["trunk"]["1"]}), "outside 1..4"),
    (lambda r: r["architecture"]["branches"]["seg"]["coding"].update(hidden=3), "no channel coding of 4 channels has 3 hidden units"),
    (lambda r: r["architecture"]["branches"]["seg"]["tail"].update(type="os.system"), "network node"),
    (lambda r: r.update(dtype="float16"), "torch.float32, the record says torch.float16"),
    (lambda r: r.update(digest="sha256:0"), "digest"),
])
def test_tampered_records_are_refused(saved, tmp_path, edit, needle):
    path = rewrite_model_record(saved, tmp_path / "edited.safetensors", edit)
    with pytest.raises(CorruptFileError, match=needle):
        load(path)


def test_pyamalgam_load_is_the_deploy_loader():
    import pyamalgam

    if "load" not in pyamalgam.__all__:
        pytest.skip("pyamalgam.load is not wired yet (pyamalgam/__init__.py _EXPORTS, docs/deploy.md)")
    assert pyamalgam.load is load

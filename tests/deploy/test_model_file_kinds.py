"""Model files of heterogeneous and smp TargetNets (issue 13): connectors (ConnectedCoding,
ConnectedTail) and segmentation-models-pytorch blocks are described, rebuilt bit-identically, and a
tampered record naming anything off the allow-list is refused before anything is built."""
import json

import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import hide_package, rewrite_model_record, tiny_loader
from pyamalgam.deploy import load, load_record, save_model
from pyamalgam.engine import CorruptFileError
from pyamalgam.models import records, unet_vgg
from pyamalgam.models.connected import BlockConnector, ConnectedCoding, ConnectedTail


def _same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    if not isinstance(out_a, dict):
        out_a, out_b = {"out": out_a}, {"out": out_b}
    assert sorted(out_a) == sorted(out_b)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k


# ---------------------------------------------------------------- heterogeneous teachers


def _two_widths():
    torch.manual_seed(0)
    return {"seg": unet_vgg("segmentation", width=1 / 16, depth=2, num_classes=5).eval(),
            "depth": unet_vgg("depth", width=1 / 8, depth=2, num_bins=8).eval()}


@pytest.fixture(scope="module")
def hetero_file(tmp_path_factory):
    """A fine-tuned TargetNet of a width-1/16 and a width-1/8 teacher, written by finetune(save=True)."""
    folder = tmp_path_factory.mktemp("hetero")
    am = Amalgamator(_two_widths(), checkpoint_dir=folder, progress=False)
    am.fit(tiny_loader(n=4, batch=2), 1, final_loss_images=2)
    am.branch_out(points={"seg": 3, "depth": 3})
    net = am.finetune(tiny_loader(n=4, batch=2), 1, save=True)
    return net.eval(), folder / "target_net.safetensors"


def test_a_heterogeneous_target_net_round_trips_bit_identically(hetero_file, images):
    net, path = hetero_file
    branch = net.branches["depth"]
    assert isinstance(branch.coding, ConnectedCoding) and isinstance(branch.tail, ConnectedTail)  # the case at hand
    loaded, record = load_record(path)
    _same_outputs(net, loaded, images)
    _same_outputs(net, loaded, torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3)))
    node = record["architecture"]["branches"]["depth"]
    assert node["coding"]["type"] == "connected_coding" and node["coding"]["connector"]["teacher_shape"][0] == 8
    assert node["tail"]["type"] == "connected_tail" and [s["key"] for s in node["tail"]["side"]] == ["skip1", "skip2"]
    assert record["architecture"]["branches"]["seg"]["coding"]["type"] == "channel_coding"  # the student's own width
    got = loaded.branches["depth"]
    assert type(got.coding) is ConnectedCoding and type(got.tail) is ConnectedTail


@pytest.mark.parametrize("student, teacher", [((4, 8, 10), (6, 4, 5)), ((3, 4, 6), (3, 8, 12))])
def test_a_resizing_connector_is_rebuilt_from_its_node(student, teacher):
    torch.manual_seed(0)
    conn = BlockConnector(student, teacher)
    coding = ConnectedCoding(torch.nn.Identity(), conn)
    node = records.describe_connector(conn, "c")
    rebuilt = records.build_connector(json.loads(json.dumps(node)))
    rebuilt.load_state_dict(conn.state_dict())
    x = torch.rand(2, *student)
    assert repr(rebuilt) == repr(conn) and torch.equal(rebuilt(x), conn(x))
    assert rebuilt.scale == conn.scale
    with pytest.raises(ValueError, match="holds side connectors"):
        records.describe_connected_coding(ConnectedCoding(coding, conn, {"skip1": conn}), lambda c: {})


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a["branches"]["depth"]["coding"].update(type="os.system"), "type one of"),
    (lambda a: a["branches"]["depth"]["coding"]["connector"].update(teacher_shape=[8, "x", 16]), "teacher_shape"),
    (lambda a: a["branches"]["depth"]["coding"]["connector"].update(teacher_shape=[16, 16, 16]),
     "builds no network that runs"),
    (lambda a: a["branches"]["depth"]["tail"]["side"][0].update(hook="eval"), "unknown field 'hook'"),
    (lambda a: a["branches"]["depth"]["tail"]["side"].pop(), "side.1.conv.conv.bias.* unexpected"),
    (lambda a: a["branches"]["depth"]["tail"].update(inner={"type": "builtins.exec"}), "network node"),
])
def test_tampered_connector_records_are_refused(hetero_file, tmp_path, edit, needle):
    _, path = hetero_file
    bad = rewrite_model_record(path, tmp_path / "edited.safetensors", lambda r: edit(r["architecture"]))
    with pytest.raises(CorruptFileError, match=needle):
        load(bad)


# ---------------------------------------------------------------- smp teachers


@pytest.fixture(scope="module")
def smp():
    return pytest.importorskip("segmentation_models_pytorch")


def _unet(smp, classes, encoder="resnet18", seed=0):
    torch.manual_seed(seed)
    return smp.Unet(encoder, encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8),
                    classes=classes).eval()


@pytest.fixture(scope="module")
def smp_file(smp, tmp_path_factory):
    """A TargetNet of an smp ResNet-18 segmentation and an smp ResNet-34 depth U-Net."""
    from pyamalgam.models import from_smp

    teachers = {"seg": from_smp(_unet(smp, 5, seed=1), "segmentation"),
                "depth": from_smp(_unet(smp, 8, "resnet34", seed=2), "depth", max_depth=4.0)}
    am = Amalgamator(teachers, progress=False, probe_size=(32, 32))
    am.branch_out(points={"seg": 5, "depth": 4})
    path = am.save_target(tmp_path_factory.mktemp("smp") / "tn.safetensors", resolution=(32, 40))
    return am.target_net.eval(), path, teachers


def test_an_smp_target_net_round_trips_bit_identically(smp_file):
    net, path, _ = smp_file
    loaded, record = load_record(path)
    _same_outputs(net, loaded, torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(4)))
    arch = record["architecture"]
    assert arch["trunk"]["1"]["type"] == "smp_block" and arch["trunk"]["1"]["model"]["encoder_name"] == "resnet18"
    tail = arch["branches"]["depth"]["tail"]
    assert tail["blocks"]["5"]["model"]["encoder_name"] == "resnet34" and tail["head"]["kind"] == "depth"
    assert tail["head"]["bin_size"] == 0.5 and record["resolution"] == [32, 40]
    assert "encoder_weights" not in json.dumps(arch)  # always rebuilt without downloading anything


def test_an_smp_teacher_round_trips(smp, tmp_path):
    from pyamalgam.models import SMPBlockNet, from_smp

    torch.manual_seed(0)
    model = smp.FPN("resnet18", encoder_weights=None, encoder_depth=5, decoder_pyramid_channels=16,
                    decoder_segmentation_channels=32, classes=3).eval()
    net = from_smp(model, "normals").eval()
    loaded, record = load_record(save_model(net, tmp_path / "fpn.safetensors"))
    assert type(loaded) is SMPBlockNet and record["kind"] == "teacher" and record["architecture"]["type"] == "smp"
    _same_outputs(net, loaded, torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5)))


def test_an_smp_model_the_file_cannot_name_is_refused_at_save(smp, tmp_path):
    from pyamalgam.models import from_smp

    net = from_smp(_unet(smp, 5))
    net.blocks["4"].smp_origin = records.SMPOrigin(None, "the reason", 4)
    with pytest.raises(ValueError, match="cannot describe block 4 .*: the reason"):
        save_model(net.tail(0), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a["trunk"]["1"]["model"].update(architecture="UnetPlusPlus"), "must name an smp model of"),
    (lambda a: a["trunk"]["1"]["model"].update(encoder_name="mobilenet_v2"), "ResNet/ResNeXt encoders"),
    (lambda a: a["trunk"]["1"]["model"].update(activation="sigmoid"), "unknown field 'activation'"),
    (lambda a: a["trunk"]["1"]["model"].update(decoder_channels=[16, "8", 8]), "decoder_channels"),
    (lambda a: a["trunk"]["1"].update(block=9), "the model has blocks 1..6"),
    (lambda a: a["trunk"]["2"]["model"].update(encoder_name="resnet34"), "missing, .* unexpected"),
    (lambda a: a["branches"]["depth"]["tail"]["head"].update(kind="raw"), "bin_size"),
])
def test_tampered_smp_records_are_refused(smp_file, tmp_path, edit, needle):
    _, path, _ = smp_file
    bad = rewrite_model_record(path, tmp_path / "edited.safetensors", lambda r: edit(r["architecture"]))
    with pytest.raises(CorruptFileError, match=needle):
        load(bad)


def test_without_smp_loading_an_smp_file_says_how_to_install_it(smp_file, monkeypatch):
    _, path, _ = smp_file
    hide_package(monkeypatch, "segmentation_models_pytorch")
    with pytest.raises(ImportError, match=r'holds a segmentation-models-pytorch network; .*pip install "pyamalgam\[smp\]"'):
        load(path)

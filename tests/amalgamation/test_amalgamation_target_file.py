"""The Amalgamator writes its final TargetNet as one model file (issue 13): finetune(save=...)
and save_target(); what the file format cannot describe is refused before any work."""
import pytest
import torch

import pyamalgam
from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader, tiny_teachers
from pyamalgam.deploy import load_record
from pyamalgam.models import unet_vgg


def _same(a, b, images):
    with torch.no_grad():
        out_a, out_b = a.eval()(images), b.eval()(images)
    assert sorted(out_a) == sorted(out_b) and all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_finetune_save_writes_a_model_file_that_loads_bit_identical(teachers, images, tmp_path):
    am = Amalgamator(teachers, checkpoint_dir=tmp_path, progress=False)
    am.fit(tiny_loader(8), 1)
    points = am.branch_out()
    net = am.finetune(tiny_loader(8), 1, save=True)
    path = tmp_path / "target_net.safetensors"
    loaded, record = load_record(path)
    _same(net, loaded, images)
    _same(net, pyamalgam.load(path), images)
    assert record["kind"] == "target_net" and record["extra"]["branch_points"] == points
    assert record["extra"]["teachers"] == sorted(teachers) and "terms" not in record["extra"]
    assert record["extra"]["parameters"]["target_net"] == am.parameter_report()["target_net"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert names == ["amalgamation.jsonl", "last.safetensors", "target_net.safetensors"]  # atomic: no temporary left


def test_save_target_to_a_path_with_resolution(teachers, images, tmp_path):
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 5, "depth": 6})
    path = am.save_target(tmp_path / "sub" / "tn.safetensors", resolution=(32, 40))
    loaded, record = load_record(path)
    assert record["resolution"] == [32, 40]
    _same(am.target_net, loaded, images)
    with pytest.raises(ValueError, match="multiples of the size divisor"):
        am.save_target(tmp_path / "bad.safetensors", resolution=(30, 40))
    with pytest.raises(ValueError, match="is a folder"):
        am.save_target(tmp_path)


def test_save_needs_a_target_net_and_a_place(teachers, tmp_path):
    am = Amalgamator(teachers, progress=False)
    with pytest.raises(RuntimeError, match="call branch_out"):
        am.save_target(tmp_path / "x.safetensors")
    am.branch_out(points={"seg": 5, "depth": 6})
    with pytest.raises(ValueError, match="needs a path, or an Amalgamator with checkpoint_dir"):
        am.save_target()
    with pytest.raises(ValueError, match="needs a path"):  # refused before the fine-tune runs
        am.finetune(tiny_loader(4), 1, save=True)
    assert not any(r["event"] == "finetune" for r in am.history)


def _heterogeneous():
    torch.manual_seed(0)
    seg = unet_vgg("segmentation", width=1 / 16, depth=2, num_classes=5).eval()
    depth = unet_vgg("depth", width=1 / 8, depth=2, num_bins=8).eval()
    return {"seg": seg, "depth": depth}


def test_a_heterogeneous_target_net_is_saved_by_the_finetune(images, tmp_path):
    """Connectors (ConnectedCoding) are described by the model file (models/connected.py): the
    fine-tune's save= writes a file that loads into the same network."""
    am = Amalgamator(_heterogeneous(), checkpoint_dir=tmp_path, progress=False)
    am.branch_out(points={"seg": 3, "depth": 3})
    am.finetune(tiny_loader(4), 1, save=True)
    _same(am.target_net, pyamalgam.load(tmp_path / "target_net.safetensors"), images)


def test_an_smp_target_net_is_saved_and_loads_the_same(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from pyamalgam.models import from_smp

    def unet(classes, seed):
        torch.manual_seed(seed)
        return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8),
                        classes=classes).eval()

    teachers = {"seg": from_smp(unet(5, 1), "segmentation"), "depth": from_smp(unet(8, 2), "depth")}
    am = Amalgamator(teachers, progress=False, probe_size=(32, 32))
    am.branch_out(points={"seg": 5, "depth": 6})
    _same(am.target_net, pyamalgam.load(am.save_target(tmp_path / "tn.safetensors")), torch.rand(2, 3, 32, 32))


def test_online_target_net_of_eq9_is_saved_with_its_nested_branch(images, tmp_path):
    am2 = Amalgamator(tiny_teachers("segmentation", "depth"), progress=False)
    am2.branch_out(points={"seg": 5, "depth": 4})
    normal = tiny_teachers("normals", seed=3)
    am3 = Amalgamator({"tn2": am2.target_net, **normal}, progress=False)
    am3.branch_out(points={"tn2": 5, "normal": 6})
    _same(am3.target_net, pyamalgam.load(am3.save_target(tmp_path / "tn3.safetensors")), images)

"""pyamalgam predict and export for edges and key-points outputs (issue 13 after issue 14), and
ONNX parity of heterogeneous and smp TargetNets."""
import numpy as np
import pytest
import torch
from PIL import Image

from pyamalgam.deploy import save_model
from pyamalgam.deploy.export import check_export, export_model
from pyamalgam.deploy.predict import _magma, predict

TOL = 1e-4


@pytest.fixture(scope="module")
def maps_net(make_target_net):
    return make_target_net(tasks=("edges", "keypoints", "segmentation"))


def _quantised(value) -> np.ndarray:
    """What the 8-bit PNG must hold: round(255 v) of v clipped to [0, 1]."""
    return np.rint(np.clip(value.double().numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)


def test_predict_writes_edge_and_keypoint_maps_with_the_networks_values(cli, maps_net, tmp_path):
    names = {type(t).__name__: n for n, t in maps_net.tasks.items()}
    edges, keypoints = names["EdgeTask"], names["KeypointTask"]
    model = save_model(maps_net, tmp_path / "maps.safetensors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli(["predict", str(model), str(tmp_path / "a.png"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"a_{edges}.png", f"a_{keypoints}.png", f"a_{keypoints}_preview.png", f"a_{names['SegmentationTask']}.png"])
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = maps_net(x)  # 32x32: no resize on the way in or out
    edge_png = Image.open(out / f"a_{edges}.png")
    assert edge_png.mode == "L" and np.array_equal(np.asarray(edge_png), _quantised(y[edges][0]))
    heat_png = Image.open(out / f"a_{keypoints}.png")
    heat = np.asarray(heat_png)
    assert heat_png.mode == "L" and np.array_equal(heat, _quantised(y[keypoints][0]))
    preview = np.asarray(Image.open(out / f"a_{keypoints}_preview.png"))
    assert preview.shape == (32, 32, 3) and np.array_equal(preview, _magma()[heat])


def test_maps_at_another_size_are_resized_back(maps_net, tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (21, 35, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    result = predict(maps_net, [tmp_path / "odd.png"], tmp_path / "out", progress=False)
    assert len(result.written[str(tmp_path / "odd.png")]) == 4 and not result.skipped
    for p in (tmp_path / "out").iterdir():
        assert Image.open(p).size == (35, 21), p.name


def test_a_network_without_a_known_output_names_all_five_tasks(tmp_path):
    with pytest.raises(ValueError, match="none of segmentation, depth, normals, edges or keypoints"):
        predict(torch.nn.Conv2d(3, 3, 1), [tmp_path / "none.png"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- export


def _onnx_parity(net, tmp_path, resolution, dynamic=False):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    exported = export_model(net, tmp_path / "net.onnx", "onnx", resolution=resolution, dynamic=dynamic)
    diffs = check_export(exported, net, "onnx", dynamic=dynamic)
    assert set(diffs) == set(net.tasks)
    for name, d in diffs.items():
        assert d["max_abs_diff"] < TOL * max(1.0, d["max_abs"]), (name, d)
    return exported


def test_edges_and_keypoints_export_to_onnx_with_parity(maps_net, tmp_path):
    _onnx_parity(maps_net, tmp_path, (32, 32))


def test_a_heterogeneous_target_net_exports_with_parity(tmp_path):
    from pyamalgam import Amalgamator
    from pyamalgam.models import unet_vgg

    torch.manual_seed(0)
    teachers = {"seg": unet_vgg("segmentation", width=1 / 16, depth=2, num_classes=5).eval(),
                "depth": unet_vgg("depth", width=1 / 8, depth=2, num_bins=8).eval()}
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 3, "depth": 3})
    _onnx_parity(am.target_net.eval(), tmp_path, (16, 24))


@pytest.mark.slow  # about 50 s on two loaded cores (ONNX export of two ResNet encoders' blocks)
def test_an_smp_target_net_exports_with_parity(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from pyamalgam import Amalgamator
    from pyamalgam.models import from_smp

    def unet(classes, encoder, seed):
        torch.manual_seed(seed)
        return smp.Unet(encoder, encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8),
                        classes=classes).eval()

    teachers = {"seg": from_smp(unet(5, "resnet18", 1), "segmentation"),
                "depth": from_smp(unet(8, "resnet34", 2), "depth", max_depth=4.0)}
    am = Amalgamator(teachers, progress=False, probe_size=(32, 32))
    am.branch_out(points={"seg": 5, "depth": 4})
    _onnx_parity(am.target_net.eval(), tmp_path, (32, 32))

"""pyamalgam predict: the files it writes, their values, skipping unreadable images, exit codes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyamalgam.deploy import save_model
from pyamalgam.deploy.predict import collect_images, network_size, palette


@pytest.fixture(scope="module")
def model(target_net, tmp_path_factory):
    return save_model(target_net, tmp_path_factory.mktemp("model") / "net.safetensors")


@pytest.fixture
def inputs(tmp_path):
    """A folder with a 32x32 PNG, an odd 21x35 JPEG, a truncated PNG and a text file named .png."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (21, 35, 3), dtype=np.uint8)).save(folder / "b.jpg")
    good = (folder / "a.png").read_bytes()
    (folder / "c_torn.png").write_bytes(good[: len(good) // 2])
    (folder / "d_text.png").write_text("not an image")
    return folder


def _outputs(out, stem):
    return sorted(p.name for p in out.glob(f"{stem}_*"))


def test_predict_writes_every_output_and_skips_unreadable_images(cli, model, target_net, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["predict", str(model), str(inputs), "--out", str(out), "--no-progress", "--batch-size", "3"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err  # data that cannot be read: 2, after the readable images were written
    summary = json.loads(captured.out)
    assert summary["written"] == 2 and sorted(summary["skipped"]) == [str(inputs / "c_torn.png"),
                                                                        str(inputs / "d_text.png")]
    assert "c_torn.png" in captured.err and "d_text.png" in captured.err
    for stem in ("a", "b"):
        assert _outputs(out, stem) == [f"{stem}_depth.png", f"{stem}_depth_preview.png", f"{stem}_normal.png",
                                       f"{stem}_seg.png"]
    sizes = {stem: Image.open(inputs / f"{stem}.{ext}").size for stem, ext in (("a", "png"), ("b", "jpg"))}
    for p in out.iterdir():
        assert Image.open(p).size == sizes[p.name[0]], p.name  # at the input's size
    assert not list(out.glob("c_*")) and not list(out.glob("d_*")) and not list(out.glob(".*"))


def test_written_values_are_the_networks_predictions(cli, model, target_net, inputs, tmp_path):
    out = tmp_path / "out"
    assert cli(["predict", str(model), str(inputs / "a.png"), "--out", str(out), "--no-progress"]) == 0
    x = torch.from_numpy(np.asarray(Image.open(inputs / "a.png"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = target_net(x)  # 32x32 is a multiple of 2^depth: no resize on the way in or out
    seg = Image.open(out / "a_seg.png")
    assert seg.mode == "P" and np.array_equal(np.asarray(seg), y["seg"].argmax(1)[0].numpy())
    assert np.array_equal(np.asarray(seg.getpalette(), dtype=np.uint8).reshape(-1, 3)[:5], palette()[:5])
    depth = Image.open(out / "a_depth.png")
    assert depth.mode.startswith("I;16")
    mm = np.asarray(depth).astype(np.float64)
    np.testing.assert_allclose(mm / 1000.0, y["depth"][0].double().numpy(), atol=0.5e-3 + 1e-6)
    normal = np.asarray(Image.open(out / "a_normal.png")).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(normal, y["normal"][0].permute(1, 2, 0).double().numpy(), atol=1 / 127.5)
    preview = np.asarray(Image.open(out / "a_depth_preview.png"))
    assert preview.shape == (32, 32, 3) and preview.reshape(-1, 3).std(0).max() > 0


def test_teacher_and_fixed_resolution(cli, inputs, tmp_path):
    from pyamalgam._testing import tiny_net

    model = save_model(tiny_net("depth", depth=3), tmp_path / "depth.safetensors")
    out = tmp_path / "out"
    argv = ["predict", str(model), str(inputs / "b.jpg"), str(inputs / "a.png"), "--out", str(out), "--no-progress",
            "--resolution", "16x24"]
    assert cli(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_depth.png", "a_depth_preview.png", "b_depth.png",
                                                     "b_depth_preview.png"]
    assert Image.open(out / "b_depth.png").size == (35, 21)


def test_helpers():
    assert network_size((21, 35), 8) == (24, 32) and network_size((3, 3), 8) == (8, 8)
    assert network_size((21, 35), 8, (16, 16)) == (16, 16)
    pal = palette()
    assert pal.shape == (256, 3) and len({tuple(c) for c in pal}) == 256 and tuple(pal[0]) == (0, 0, 0)
    with pytest.raises(FileNotFoundError, match="no image or folder"):
        collect_images(["/no/such/image.png"])


@pytest.mark.parametrize("argv, needle", [
    (["predict", "MODEL", "IMG", "--out", "OUT", "--batch-size", "0"], "positive integer"),
    (["predict", "MODEL", "IMG", "--out", "OUT", "--device", "tpu"], "cpu, cuda or cuda:N"),
    (["predict", "MODEL", "IMG", "--out", "OUT", "--resolution", "30x32"], "multiples of the model's size divisor 4"),
    (["predict", "MODEL", "/no/such.png", "--out", "OUT"], "no image or folder"),
    (["predict", "MODEL", "EMPTY", "--out", "OUT"], "holds no"),
    (["predict", "MODEL", "IMG"], "--out"),
    (["predict", "/no/model.safetensors", "IMG", "--out", "OUT"], "no model file"),
    (["predict", "BAD", "IMG", "--out", "OUT"], "not a model file"),
    (["predict", "MODEL", "IMG", "--out", "FILE"], "not a folder"),
    (["export", "MODEL", "--format", "tflite"], "invalid choice"),
    (["export", "MODEL", "--format", "onnx", "--keep-ops"], "--keep-ops"),
    (["export", "MODEL", "--format", "pt2", "--resolution", "6x8"], "multiples of the model's size divisor 4"),
    (["export", "BAD", "--format", "pt2"], "not a model file"),
])
def test_bad_arguments_exit_2(cli, argv, needle, model, inputs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    (tmp_path / "file").write_text("x")
    names = {"MODEL": str(model), "IMG": str(inputs / "a.png"), "OUT": str(tmp_path / "out"),
             "EMPTY": str(tmp_path / "empty"), "BAD": str(tmp_path / "bad.safetensors"), "FILE": str(tmp_path / "file")}
    rc = cli([names.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing written before the arguments were checked

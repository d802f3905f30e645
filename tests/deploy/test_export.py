"""Export to ONNX and .pt2: parity with PyTorch, dynamic sizes, and no fused pyamalgam:: operator
left in a graph whose runtime cannot run it."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pyamalgam._testing import tiny_net
from pyamalgam.deploy.export import (
    FORMATS,
    OutputTuple,
    check_export,
    decompose,
    export_model,
    export_program,
    pyamalgam_nodes,
)

TOL = 1e-4  # issue 13: ONNX Runtime matches PyTorch to 1e-4 on CPU


def _eager(net, x):
    with torch.no_grad():
        return OutputTuple(net.eval())(x)


def test_decomposition_leaves_no_fused_operator_and_matches_float64(target_net):
    net = tiny_net("depth", depth=2)
    program, _, _ = export_program(net, (16, 16), keep_ops=True)
    assert "pyamalgam.soft_argmax_depth.default" in pyamalgam_nodes(program)  # the check can fail
    plain = decompose(program)
    assert pyamalgam_nodes(plain) == []
    # the reference formulas, traced in float64, against the fused network in float64
    wide = tiny_target_net_double(target_net)
    program64, _, names = export_program(wide, (16, 24))
    assert pyamalgam_nodes(program64) == []
    x = torch.rand(1, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = program64.module()(x)
    for name, g, e in zip(names, got, _eager(wide, x)):
        # the heads decode depth and normalise normals in float32 on purpose (heads.py): those to fp32
        tol = 1e-10 if e.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=name)
    assert _eager(wide, x)[0].dtype == torch.float64  # the coded segmentation branch is checked in float64


def tiny_target_net_double(net):
    import copy

    return copy.deepcopy(net).double().eval()


@pytest.fixture(scope="module")
def onnx_dynamic(target_net, tmp_path_factory):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return export_model(target_net, tmp_path_factory.mktemp("onnx") / "net.onnx", "onnx", resolution=(32, 32),
                        dynamic=True)


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_matches_pytorch_static(tmp_path, images):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnx

    net = tiny_net("depth", depth=2)  # a teacher: the fused soft-argmax of Eq. 2 in its head
    exported = export_model(net, tmp_path / "depth.onnx", "onnx", resolution=(32, 32))
    model = onnx.load(str(exported.path))
    assert not [n.op_type for n in model.graph.node if "pyamalgam" in n.domain + n.op_type]
    assert [o.name for o in model.graph.output] == exported.names == ["depth"]
    session = _ort(exported.path)
    x = images[:1]
    for name, got, want in zip(exported.names, session.run(None, {"image": x.numpy()}), _eager(net, x)):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=TOL, atol=TOL, msg=name)
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # static: another batch is refused
        session.run(None, {"image": images.numpy()})


def test_onnx_dynamic_batch_and_size(onnx_dynamic, target_net):
    import onnx

    model = onnx.load(str(onnx_dynamic.path))
    assert not [n.op_type for n in model.graph.node if "pyamalgam" in n.domain + n.op_type]
    assert [o.name for o in model.graph.output] == onnx_dynamic.names == list(target_net.tasks)
    session = _ort(onnx_dynamic.path)
    for shape in [(1, 3, 4, 4), (3, 3, 16, 40), (2, 3, 36, 24)]:  # any multiple of 2^depth = 4
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        for name, got, want in zip(onnx_dynamic.names, session.run(None, {"image": x.numpy()}),
                                   _eager(target_net, x)):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=TOL, atol=TOL, msg=f"{name} {shape}")
    # ONNX Runtime does not check the size (docs/deploy.md): 14 = no multiple of 4 fails in the unpooling
    with pytest.raises(Exception, match="ScatterND"):
        session.run(None, {"image": torch.rand(1, 3, 14, 16).numpy()})
    diffs = check_export(onnx_dynamic, target_net, "onnx", dynamic=True)
    assert set(diffs) == set(target_net.tasks) and all(d["max_abs_diff"] < TOL for d in diffs.values())


def test_pt2_portable_loads_without_pyamalgam(tmp_path, images, pyamalgam_env):
    net = tiny_net("depth", depth=2)
    exported = export_model(net, tmp_path / "d.pt2", "pt2", resolution=(32, 32), dynamic=True)
    assert exported.fused_ops == []
    x = images[:1, :, :16, :24]
    save_file({"x": x.contiguous(), "y": _eager(net, x)[0].contiguous()}, str(tmp_path / "io.safetensors"))
    code = ("import sys, torch; from safetensors.torch import load_file; t = load_file(sys.argv[2]); "
            "p = torch.export.load(sys.argv[1]); y = p.module()(t['x'])[0]; "
            "print(float((y - t['y']).abs().max()), 'pyamalgam' in sys.modules)")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(exported.path), str(tmp_path / "io.safetensors")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    diff, imported = out.stdout.split()
    assert float(diff) < TOL and imported == "False"


def test_pt2_keep_ops_keeps_them_and_matches(tmp_path, target_net, images):
    exported = export_model(target_net, tmp_path / "t.pt2", "pt2", resolution=(32, 32), keep_ops=True)
    assert "pyamalgam.channel_coding.default" in exported.fused_ops
    got = torch.export.load(str(exported.path)).module()(images[:1])
    for name, g, e in zip(exported.names, got, _eager(target_net, images[:1])):
        assert torch.equal(g, e), name  # the same kernels: bit for bit


def test_bad_export_arguments(tmp_path):
    net = tiny_net("segmentation", depth=2)
    with pytest.raises(ValueError, match="multiples of the size divisor 4"):
        export_model(net, tmp_path / "x.pt2", "pt2", resolution=(30, 32))
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(net, tmp_path / "x.tflite", "tflite")
    with pytest.raises(ValueError, match="keep_ops"):
        export_model(net, tmp_path / "x.onnx", "onnx", keep_ops=True)
    assert FORMATS == ("onnx", "pt2") and not list(tmp_path.iterdir())


def test_export_command(cli, tmp_path, capsys):
    model = tmp_path / "seg.safetensors"
    from pyamalgam.deploy import save_model

    save_model(tiny_net("segmentation", depth=2), model, resolution=(16, 24))
    assert cli(["export", str(model), "--format", "pt2", "--dynamic"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(tmp_path / "seg.pt2") and summary["traced_shape"] == [2, 3, 16, 24]
    assert summary["fused_ops_left"] == 0 and summary["check"]["seg"]["max_abs_diff"] < TOL


def test_export_ok_judges_against_tolerance_and_conditioning():
    from pyamalgam.deploy.export import export_ok

    diffs = {"seg": {"max_abs_diff": 3e-4, "max_abs": 0.5, "torch_float32_error": 1e-6},     # fails
             "big": {"max_abs_diff": 3e-4, "max_abs": 10.0, "torch_float32_error": 1e-6},    # relative: passes
             "normal": {"max_abs_diff": 3e-4, "max_abs": 1.0, "torch_float32_error": 1e-4}}  # ill-conditioned: passes
    assert list(export_ok(diffs)) == ["seg"]

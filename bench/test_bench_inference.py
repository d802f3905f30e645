"""TargetNet-3 inference on the CPU (images/s): eager vs ``torch.compile`` vs ONNX Runtime, one run.

    pytest bench/test_bench_inference.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

The network is the demo's full preset (pyamalgam/demo/config.py): three VGG teachers at width 1/8,
depth 5 (N = 10 blocks), 32 depth bins, the synthetic scenes' classes, amalgamated into a TargetNet
with branch points seg 8, depth 7, normal 9 (weights random: the speed does not depend on them), on
a batch of 8 images of 64x96. Eager runs the fused operators under ``inference_mode``; compiled is
``torch.compile(net)`` (default mode, warmed up before timing); ONNX Runtime runs the
``pyamalgam export --format onnx --dynamic`` file (fused operators decomposed into their
reference formulas) with as many intra-op threads as torch has. One torch thread for all three,
as in the other CPU benchmarks. The three must agree on the same batch to 1e-4, or to 10x eager's
own float32 error (vs float64) where that is larger.

Under ``--benchmark-disable`` (the CI smoke run) the network is tiny (width 1/16, depth 2, 32x32).
"""
import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import torch_threads
from pyamalgam.models import segnet_vgg

FULL = {"width": 1 / 8, "depth": 5, "hw": (64, 96), "batch": 8, "points": {"seg": 8, "depth": 7, "normal": 9}}
SMOKE = {"width": 1 / 16, "depth": 2, "hw": (32, 32), "batch": 2, "points": {"seg": 4, "depth": 3, "normal": 4}}
IMPLS = ["eager", "compile", "onnxruntime"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def case(request):
    return SMOKE if request.config.getoption("benchmark_disable") else FULL


@pytest.fixture(scope="module")
def target_net(case):
    from pyamalgam.data.synthetic import SyntheticScenes

    teachers = {}
    for seed, (name, task) in enumerate((("seg", "segmentation"), ("depth", "depth"), ("normal", "normals"))):
        torch.manual_seed(seed)
        teachers[name] = segnet_vgg(task, width=case["width"], depth=case["depth"], num_classes=SyntheticScenes.num_classes,
                                    num_bins=32, name=name).eval()
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points=case["points"])
    return am.target_net.eval()


@pytest.fixture(scope="module")
def batch(case):
    return torch.rand(case["batch"], 3, *case["hw"], generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runners(target_net, batch, tmp_path_factory):
    """Implementation name -> a function batch -> tuple of outputs in task order."""
    names = list(target_net.tasks)

    def eager(x):
        with torch.inference_mode():
            out = target_net(x)
        return tuple(out[n] for n in names)

    compiled_net = torch.compile(target_net)

    def compiled(x):
        with torch.inference_mode():
            out = compiled_net(x)
        return tuple(out[n] for n in names)

    runs = {"eager": eager, "compile": compiled}
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401
    except ImportError:
        return runs
    from pyamalgam.deploy import export_model

    path = export_model(target_net, tmp_path_factory.mktemp("onnx") / "target.onnx", "onnx",
                        resolution=tuple(batch.shape[-2:]), dynamic=True).path
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runs["onnxruntime"] = lambda x: tuple(torch.from_numpy(y) for y in session.run(None, {"image": x.numpy()}))
    return runs


def _runner(runners, impl):
    if impl not in runners:
        pytest.skip("onnxruntime / onnxscript not installed (pip install \"pyamalgam[export]\")")
    return runners[impl]


def test_same_result(runners, target_net, batch):
    """Every implementation within 1e-4 of eager, or within 10x eager's own float32 error (normals of
    random weights are normalised from tiny vectors, which amplifies every rounding)."""
    import copy

    want = runners["eager"](batch)
    with torch.inference_mode():
        out = copy.deepcopy(target_net).double()(batch.double())
    truth = [out[n] for n in target_net.tasks]
    for impl in IMPLS[1:]:
        if impl in runners:
            for name, y, w, t in zip(target_net.tasks, runners[impl](batch), want, truth):
                own = float((w.double() - t).abs().max())
                diff = float((y.double() - w.double()).abs().max())
                assert diff <= max(1e-4, 10 * own), f"{impl} {name}: {diff} (eager's float32 error {own})"


@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, runners, batch, case, impl):
    run = _runner(runners, impl)
    run(batch)  # warm-up (torch.compile compiles here)
    h, w = case["hw"]
    benchmark.group = f"TargetNet-3 inference, B{case['batch']} {h}x{w}, width {case['width']:g}, depth {case['depth']}"
    benchmark.extra_info.update(impl=impl, batch=case["batch"])
    benchmark.pedantic(run, args=(batch,), rounds=7, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = case["batch"] / benchmark.stats.stats.median

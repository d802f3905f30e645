"""The demo writes every final TargetNet as a model file (issue 13) that `pyamalgam.load` and
`pyamalgam predict` read, and `structured_rows` adds Table 1 rows with the Amalgamator's
structured terms (issue 12); both on the tiny preset of test_demo_reproducible."""
import json

import numpy as np
import pytest
from PIL import Image

import pyamalgam
from pyamalgam.cli import main
from pyamalgam.demo import demo_config, evaluate, run_demo
from pyamalgam.demo.stages import InMemoryScenes

MODELS = ("tn2", "tn2_pi", "tn3_offline", "tn3_online")


def _tiny(**overrides):
    return demo_config(False, "cpu", resolution=(32, 32), width=1 / 16, depth=3, num_bins=8, train_size=16,
                       unlabelled_size=16, test_size=8, batch_size=4, teacher_steps=3, block_steps=2,
                       finetune_steps=3, probe_images=8, eval_batch=8, figure_samples=2, **overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(out, device="cpu", config=_tiny(structured_rows="pi"), progress=False, echo=False)
    return out, results


def _test_split(out):
    from pyamalgam.engine import load_checkpoint

    tensors, meta = load_checkpoint(out / "data" / "test.safetensors")
    return InMemoryScenes(tensors, **meta["attrs"])


@pytest.mark.slow  # one tiny demo run, shared by the module
def test_every_final_target_net_is_a_model_file_that_loads(run):
    out, results = run
    assert results["models"] == {name: f"models/{name}.safetensors" for name in MODELS}
    test = _test_split(out)
    for name, key, tasks in (("tn2", "tn2_eq7", ("seg", "depth")), ("tn2_pi", "tn2_eq7_pi", ("seg", "depth")),
                             ("tn3_offline", "tn3_offline", ("seg", "depth", "normal")),
                             ("tn3_online", "tn3_online", ("seg", "depth", "normal"))):
        net = pyamalgam.load(out / "models" / f"{name}.safetensors")
        assert net.points == results["targets"][key]["points"], name
        measured = evaluate(net, test, tasks, batch_size=8)
        for task in tasks:  # the file holds the network that was evaluated (channels_last aside)
            for metric, value in measured[task].items():
                assert value == pytest.approx(results["targets"][key]["metrics"][task][metric], abs=5e-3), (name, metric)


@pytest.mark.slow  # one tiny demo run, shared by the module
def test_a_model_file_runs_under_pyamalgam_predict(run, tmp_path):
    out, _ = run
    image = _test_split(out)[0]["image"]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "scene.png")
    rc = main(["predict", str(out / "models" / "tn3_offline.safetensors"), str(tmp_path / "scene.png"),
               "--out", str(tmp_path / "pred"), "--no-progress"])
    assert rc == 0
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert {"scene_seg.png", "scene_depth.png", "scene_normal.png"} <= set(written), written


@pytest.mark.slow  # one tiny demo run, shared by the module
def test_structured_rows_are_table_1_rows_after_eq7(run):
    out, results = run
    labels = [row["label"] for row in json.loads((out / "table1.json").read_text())["rows"]]
    assert labels[-2].startswith("TargetNet, Eq. 7 (") and labels[-1].startswith("TargetNet, Eq. 7 + PI (")
    pi = results["targets"]["tn2_eq7_pi"]
    assert pi["structured"] == ["pi"] and pi["params"] > 0
    summary = results["amalgamations"]["tn2_pi"]
    assert set(summary["loss_table"]) == {"seg", "depth"}  # Eq. 7 compares task losses
    log = [json.loads(line) for line in (out / "stages" / "tn2_pi" / "amalgamation.jsonl").read_text().splitlines()]
    assert any("pi/seg" in r.get("train_losses", {}) for r in log)


@pytest.mark.slow  # one tiny demo run, shared by the module
def test_a_rerun_from_the_caches_writes_the_same_model_files(run):
    out, _ = run
    before = {name: (out / "models" / f"{name}.safetensors").read_bytes() for name in MODELS}
    results = run_demo(out, device="cpu", config=_tiny(structured_rows="pi"), progress=False, echo=False)
    assert all(t["cached"] for name, t in results["timings"].items() if name.startswith("TargetNet"))
    assert {name: (out / "models" / f"{name}.safetensors").read_bytes() for name in MODELS} == before


@pytest.mark.parametrize("value, canonical", [("", ""), ("PI, pa+pi", "pi,pi+pa"), (("cwd", "pa+pi"), "cwd,pi+pa")])
def test_structured_rows_field_is_normalised(value, canonical):
    assert demo_config(True, "cpu", structured_rows=value).structured_rows == canonical


@pytest.mark.parametrize("value, needle", [("pi,ho", "row 'ho'"), ("pi+pi", "distinct"), ("pi,pi", "twice"),
                                           (3, "must be a string")])
def test_bad_structured_rows_are_refused(value, needle):
    with pytest.raises((TypeError, ValueError), match=needle):
        demo_config(True, "cpu", structured_rows=value)

"""Teachers of the edges and key-points tasks: amalgamated (fit, branch_out, finetune), saved and
loaded as model files, trained and evaluated by pyamalgam.teachers on the synthetic targets."""
import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader, tiny_net
from pyamalgam.data import SyntheticScenes
from pyamalgam.deploy import load, save_model
from pyamalgam.losses import EdgeTask, KeypointTask
from pyamalgam.teachers import evaluate_teacher, load_teacher, train_teacher


@pytest.fixture(scope="module")
def new_teachers():
    return {"edges": tiny_net("edges", 1), "keypoints": tiny_net("keypoints", 2)}


@pytest.fixture(scope="module")
def amalgamated(new_teachers):
    torch.manual_seed(0)
    am = Amalgamator(new_teachers, progress=False)
    loader = tiny_loader(8, 4)
    am.fit(loader, 1)
    am.branch_out()
    am.finetune(loader, 1)
    return am


def test_teachers_declare_their_tasks(new_teachers):
    assert type(new_teachers["edges"].task) is EdgeTask and type(new_teachers["keypoints"].task) is KeypointTask


def test_amalgamation_of_edges_and_keypoints_teachers(amalgamated, new_teachers):
    net = amalgamated.target_net.eval()
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        ref = {k: t(x) for k, t in new_teachers.items()}
    assert set(out) == {"edges", "keypoints"}
    for k in out:
        assert out[k].shape == ref[k].shape == (2, 32, 40) and torch.isfinite(out[k]).all()
    assert 0 <= out["edges"].min() and out["edges"].max() <= 1
    assert set(amalgamated.branch_points) == {"edges", "keypoints"}


def test_model_files_round_trip(tmp_path, new_teachers, amalgamated):
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    for name, net in [*new_teachers.items(), ("target", amalgamated.target_net.eval())]:
        loaded = load(save_model(net, tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            a, b = net(x), loaded(x)
        if isinstance(a, dict):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
            assert {k: type(t) for k, t in loaded.tasks.items()} == {"edges": EdgeTask, "keypoints": KeypointTask}
        else:
            assert torch.equal(a, b) and type(loaded.task) is type(net.task)


@pytest.mark.parametrize("task", ["edges", "keypoints"])
def test_train_save_load_and_evaluate_a_teacher(tmp_path, task):
    data = SyntheticScenes("train", size=4, resolution=(16, 24), seed=2, targets=(task,))
    net, record = train_teacher(task, data, steps=2, batch_size=2, width=1 / 16, depth=3, progress=False,
                                out=tmp_path / task)
    assert record.task == task and len(record.losses) == 2 and all(torch.isfinite(torch.tensor(record.losses)))
    again, _ = load_teacher(tmp_path / task)
    x = data[0]["image"][None]
    with torch.no_grad():
        assert torch.equal(net(x), again(x))
    scores = evaluate_teacher(again, data, batch_size=3)
    keys = {"abs", "mse", "precision", "recall"} | ({"f1"} if task == "edges" else set())
    assert set(scores) == keys and 0 <= scores["abs"] <= 1.5


def test_a_teacher_task_without_ground_truth_is_refused():
    data = SyntheticScenes("train", size=2, resolution=(16, 24))  # no targets asked for
    with pytest.raises(ValueError, match="no ground truth for 'edges'"):
        train_teacher("edges", data, steps=1, width=1 / 16, depth=3, progress=False)
    with pytest.raises(ValueError, match="no ground truth for 'keypoints'"):
        evaluate_teacher(tiny_net("keypoints"), data)


def test_the_train_teacher_command_opens_the_targets(tmp_path):
    from pyamalgam.teachers import open_dataset, run_train_teacher

    summary = run_train_teacher("keypoint", tmp_path / "kp", resolution="16x24", size=2, steps=1, batch_size=2,
                                width=1 / 16, depth=3, progress=False)
    assert summary["task"] == "keypoints" and load_teacher(tmp_path / "kp").record.task == "keypoints"
    assert open_dataset("synthetic", "test", size=1, targets=("edges",)).tasks[-1] == "edges"
    with pytest.raises(ValueError, match="no edges ground truth"):
        open_dataset("nyuv2:/nowhere", "train", targets=("edges",))

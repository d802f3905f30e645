"""`task_weights` (the lambdas of Eq. 6 / 8 / 9) reach every amalgamation stage of the demo, change
its cache keys and its tables' caption, and are refused clearly when malformed."""
import pytest

from pyamalgam.demo import demo_config, run_demo
from pyamalgam.demo.stages import _Amalgamation


def _tiny(**overrides):
    return demo_config(False, "cpu", resolution=(32, 32), width=1 / 16, depth=3, num_bins=8, train_size=16,
                       unlabelled_size=16, test_size=8, batch_size=4, teacher_steps=3, block_steps=2,
                       finetune_steps=3, probe_images=8, eval_batch=8, figure_samples=2, **overrides)


@pytest.mark.parametrize("value, canonical", [("depth=3", "depth=3"), (" Depth = 2.5 , seg=1", "depth=2.5"),
                                              ("depth=1", ""),  # lambda 1 is the default: same config, same keys
                                              ({"normal": 2, "seg": 0.5}, "seg=0.5,normal=2"), ("", "")])
def test_task_weights_are_normalised(value, canonical):
    cfg = demo_config(True, "cpu", task_weights=value)
    assert cfg.task_weights == canonical
    assert cfg.lambdas(("seg", "depth")) == {k: float(v) for k, v in (p.split("=") for p in canonical.split(",") if p)
                                             if k in ("seg", "depth")}


@pytest.mark.parametrize("value, needle", [("depth", "TASK=LAMBDA"), ("edges=2", "TASK=LAMBDA"),
                                           ("depth=0", "task_weights[depth]"), ("depth=inf", "task_weights[depth]"),
                                           ("depth=x", "task_weights[depth]"), ("depth=2,depth=3", "at most once"),
                                           (3, "must be a string")])
def test_bad_task_weights_are_refused(value, needle):
    with pytest.raises((TypeError, ValueError), match=needle.replace("[", r"\[").replace("]", r"\]")):
        demo_config(True, "cpu", task_weights=value)


@pytest.mark.slow  # one tiny demo run
def test_task_weights_reach_every_stage_and_the_caption(tmp_path, monkeypatch):
    seen = {}
    new = _Amalgamation._new_amalgamator

    def spy(self):
        am = new(self)
        seen[self.name] = dict(am._weights)
        return am

    monkeypatch.setattr(_Amalgamation, "_new_amalgamator", spy)
    run_demo(tmp_path, device="cpu", config=_tiny(task_weights="depth=3,normal=2"), progress=False, echo=False)
    assert seen["tn2"] == {"seg": 1.0, "depth": 3.0}
    assert seen["tn3_offline"] == {"seg": 1.0, "depth": 3.0, "normal": 2.0}
    # Eq. 9: TargetNet-2 teaches with the lambdas it was trained with; normal gets its own
    assert seen["tn3_online"] == {"seg": 1.0, "depth": 3.0, "normal": 2.0}
    assert "task lambdas depth 3, normal 2 (others 1)" in (tmp_path / "table2.md").read_text()

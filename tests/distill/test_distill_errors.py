"""Bad arguments fail when the Distiller is built, with an error that names the argument."""
import pytest
import torch
from torch import nn

from _distill_cases import FakeHolistic, loader, nets
from pyamalgam.distill import Distiller


def make(terms, **kwargs):
    torch.manual_seed(0)
    teacher, student = nets()
    return Distiller(teacher, student, terms=terms, progress=False, **kwargs)


@pytest.mark.parametrize("terms, error, match", [
    ({"pixel": 10.0}, ValueError, r"unknown term 'pixel'; the terms are \['pi', 'pa', 'cwd', 'ho'\]"),
    ({}, ValueError, "terms is empty and the student has no task loss"),
    ([("pi", 10.0)], TypeError, "terms must be a mapping"),
    ({"pi": "ten"}, TypeError, r"terms\['pi'\] must be a weight, a spec dict or a loss object"),
    ({"pi": -1.0}, ValueError, r"terms\['pi'\]: the weight must be a finite number >= 0"),
    ({"pa": float("nan")}, ValueError, r"terms\['pa'\]: the weight"),
    ({"pa": {"radius": 1, "patchs": 2}}, ValueError, r"terms\['pa'\]: unknown option\(s\) \['patchs'\]"),
    ({"pi": {"temperature": 0.0}}, ValueError, r"terms\['pi'\]: temperature must be a finite number > 0"),
    ({"pa": {"tap": ("block", 9)}}, ValueError, r"student tap \('block', 9\).*blocks 1\.\.6"),
    ({"pa": {"tap": ("module", "blocks.9")}}, ValueError, r"no submodule 'blocks\.9'; close names"),
    ({"pa": {"tap": {"students": ("block", 1)}}}, ValueError, r"terms\['pa'\]\['tap'\].*'student' and 'teacher'"),
    ({"ho": nn.Identity()}, TypeError, r"terms\['ho'\] must be a HolisticDistillation-like.*lacks"),
    ({"ho": {"tap": ("block", 2)}}, ValueError, r"terms\['ho'\]: the holistic term .* takes no tap"),
    ({"mc": 1.0}, ValueError, "a term name must be"),
    ({"my": {"loss": 3}}, TypeError, r"terms\['my'\]\['loss'\] must be callable"),
    ({"my": {"loss": lambda s, t: (s - t).abs(), "weight": 1}}, TypeError,
     r"terms\['my'\] must return a floating-point scalar tensor"),
    ({"pi": {"tap": ("block", 3)}}, ValueError, r"terms\['pi'\] cannot read .*\('block', 3\).*same shape"),
])
def test_bad_terms_name_the_entry(terms, error, match):
    with pytest.raises(error, match=match):
        make(terms, task_loss=False) if terms == {} else make(terms)


def test_pa_feature_maps_of_different_sizes_name_the_term_and_taps():
    with pytest.raises(ValueError, match=r"terms\['pa'\] cannot read the student's \('block', 1\) \(1, 4, 16, 16\) "
                                         r"and the teacher's \('block', 2\)"):
        make({"pa": {"tap": {"student": ("block", 1), "teacher": ("block", 2)}}})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": "0.1"}, ValueError, "lr must be"),
    ({"momentum": 1.0}, ValueError, "momentum must be a finite number >= 0 and < 1"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"optimizer": "lbfgs"}, ValueError, r"optimizer must be one of \['sgd', 'adam'\]"),
    ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be a positive int"),
    ({"task_loss": "ce"}, TypeError, "task_loss must be None, False or a callable"),
    ({"taps": ("block", 0)}, ValueError, r"taps: the block number must be an int >= 1"),
    ({"ignore_index": 2.5}, TypeError, "ignore_index must be an int"),
    ({"probe_size": (0, 8)}, ValueError, r"probe_size must be \(H, W\)"),
])
def test_bad_settings_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        make({"pi": 10.0}, **kwargs)


def test_bad_networks():
    teacher, student = nets()
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        Distiller(lambda x: x, student, terms={"pi": 1.0})
    with pytest.raises(ValueError, match="must be two networks"):
        Distiller(student, student, terms={"pi": 1.0})
    shared = nn.Sequential(teacher.blocks["1"])
    with pytest.raises(ValueError, match="share"):
        Distiller(teacher, nn.Sequential(shared), terms={"pi": 1.0})


def test_feature_terms_on_a_plain_network_need_a_tap():
    teacher = nets()[0]
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    with pytest.raises(ValueError, match=r"terms\['pa'\]: the student \(Sequential\) is not a block-protocol.*taps="):
        Distiller(teacher, plain, terms={"pa": 1.0}, progress=False)
    d = Distiller(teacher, plain, terms={"pa": 1.0, "pi": 1.0}, taps={"student": ("module", "0")}, progress=False)
    assert d.specs[0].student.key == "module:0" and d.specs[0].teacher.key == "block:6"


def test_bad_images_name_the_batch_key():
    d = make({"pi": 1.0})
    with pytest.raises(ValueError, match=r"batch\['image'\] has spatial size 30x32"):
        d.losses({"image": torch.rand(1, 3, 30, 32)})
    with pytest.raises(KeyError, match="must hold 'image'"):
        d.losses({"img": torch.rand(1, 3, 32, 32)})


def test_the_holistic_critic_must_take_the_students_channels():
    with pytest.raises(ValueError, match=r"terms\['ho'\]: the critic takes 3-channel maps, the student predicts 5"):
        make({"ho": FakeHolistic(3)})


def test_a_non_finite_loss_stops_the_run_with_a_hint(tmp_path):
    from pyamalgam.engine import NonFiniteLossError

    d = make({"pi": 1.0, "nan": {"loss": lambda s, t: (s * float("nan")).mean()}}, checkpoint_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"lower lr .* the weight of the term"):
        d.fit(loader(), 1)
    assert not (tmp_path / "last.safetensors").exists()


def test_ho_by_weight_builds_the_holistic_module_or_says_it_is_missing():
    import importlib.util

    if importlib.util.find_spec("pyamalgam.losses.holistic") is None:
        with pytest.raises(ValueError, match=r"terms\['ho'\]: pyamalgam.losses.holistic is not available"):
            make({"ho": 0.1})
    else:  # once it lands: built for the student's 5 classes
        d = make({"ho": 0.1})
        assert getattr(d.holistic, "num_classes", 5) == 5 and d.weights["ho"] == 0.1

"""Bad inputs give errors that name the argument (and, for teachers, the block and both shapes)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_net as tiny
from pyamalgam.models import unet_vgg


def test_teachers_must_be_a_mapping_of_block_networks():
    with pytest.raises(TypeError, match="teachers must be a non-empty mapping"):
        Amalgamator([tiny("segmentation")])
    with pytest.raises(TypeError, match=r"teachers\['seg'\] must be an nn.Module speaking the block protocol"):
        Amalgamator({"seg": torch.nn.Conv2d(3, 3, 1)})


def test_different_block_counts_name_both_teachers():
    with pytest.raises(ValueError, match=r"teachers\['depth'\] has 4, teachers\['seg'\] has 6"):
        Amalgamator({"seg": tiny("segmentation"), "depth": tiny("depth", depth=2)})


def test_different_feature_shapes_name_the_block_and_both_shapes():
    with pytest.raises(ValueError, match=r"block 1: teachers\['depth'\] gives features \(8, 16, 16\) but the student .* gives \(4, 16, 16\)"):
        Amalgamator({"seg": tiny("segmentation"), "depth": tiny("depth", width=1 / 8)})


def test_different_side_information_is_refused():
    with pytest.raises(ValueError, match=r"teachers\['depth'\] carries side information \['skip1'"):
        Amalgamator({"seg": tiny("segmentation"), "depth": tiny("depth", factory=unet_vgg)}, probe_size=(16, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "eq7"}, "objective must be one of"),
        ({"init": "imagenet"}, "init must be 'teacher', 'random' or a teacher name"),
        ({"weights": {"normal": 1.0}}, r"weights: unknown name\(s\) \['normal'\]"),
        ({"weights": {"seg": -1.0}}, r"weights\['seg'\] must be a finite number >= 0"),
        ({"tasks": {"normal": "normals"}}, r"tasks: unknown teacher\(s\) \['normal'\]"),
        ({"lr": 0.0}, "lr has an invalid value 0.0"),
        ({"momentum": 1.0}, "momentum has an invalid value"),
        ({"reduction": 0}, "reduction has an invalid value"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a positive int"),
        ({"cache_targets": -1}, "cache_targets must be a number of bytes >= 0"),
    ],
)
def test_bad_settings_name_the_argument(teachers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Amalgamator(teachers, **kwargs)


def test_two_teachers_with_the_same_output_are_refused():
    am = Amalgamator({"seg": tiny("segmentation"), "depth": tiny("depth")}, progress=False)
    am.branch_out(points={"seg": 6, "depth": 6})
    with pytest.raises(ValueError, match=r"output 'seg' is predicted by both teachers\['seg'\] and teachers\['t2'\]"):
        Amalgamator({"seg": tiny("segmentation"), "t2": am.target_net})


def test_bad_batches_name_what_was_wrong(teachers):
    am = Amalgamator(teachers, progress=False)
    with pytest.raises(KeyError, match="a batch dict must hold 'image'"):
        am.fit(DataLoader([{"rgb": torch.rand(3, 32, 40)}] * 2, batch_size=2), 1)
    with pytest.raises(ValueError, match=r"batch\[0\] has spatial size 30x40, but H and W must be divisible by 8"):
        am.fit(DataLoader(TensorDataset(torch.rand(2, 3, 30, 40)), batch_size=2), 1)
    with pytest.raises(TypeError, match="batch must be a floating-point image batch"):
        am.fit(DataLoader(torch.zeros(2, 3, 32, 40, dtype=torch.uint8), batch_size=2), 1)


def test_bad_fit_and_finetune_arguments(teachers, tmp_path):
    am = Amalgamator(teachers, progress=False)
    data = DataLoader(TensorDataset(torch.rand(2, 3, 32, 40)), batch_size=2)
    with pytest.raises(ValueError, match="epochs_per_block must be a positive int, got 0"):
        am.fit(data, 0)
    with pytest.raises(ValueError, match="max_steps must be a positive int or None"):
        am.fit(data, 1, max_steps_per_block=-1)
    with pytest.raises(TypeError, match="loader must have a length"):
        am.fit((b for b in data), 1)
    with pytest.raises(TypeError, match=r"loader must be re-iterable \(e.g. a DataLoader\)"):
        am.fit(iter(data), 1)
    with pytest.raises(RuntimeError, match=r"finetune\(\) needs a TargetNet: call branch_out\(\) first"):
        am.finetune(data, 1)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        am.fit(data, 1, resume=True)
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint at"):
        am.fit(data, 1, resume=tmp_path / "missing.safetensors")


class _LyingLoader:
    """Claims batches but yields none: the trainer must fail, not spin forever."""

    def __len__(self):
        return 2

    def __iter__(self):
        return iter(())


def test_a_loader_that_yields_nothing_is_an_error_not_a_hang(teachers):
    am = Amalgamator(teachers, progress=False)
    with pytest.raises(RuntimeError, match=r"loader yielded no batch in epoch 0 although len\(loader\) = 2"):
        am.fit(_LyingLoader(), 1)

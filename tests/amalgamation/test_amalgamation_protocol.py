"""The Amalgamator speaks only the block protocol: a network written elsewhere, implementing the
declared members of BlockNetwork (and, to seed the student, BlockTrunk), is amalgamated; a
network that lacks one is refused with an error that names it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader
from pyamalgam.amalgamation.setup import check_teachers
from pyamalgam.losses import get_task
from pyamalgam.models import BlockNetwork, BlockTrunk


class _Conv(nn.Module):
    """A block without side information: one 3x3 convolution at the input's resolution."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, side):
        return F.relu(self.conv(x))


def _run(chain, x, side):
    for block in chain:
        x = block(x, side)
    return x


class _Trunk(BlockTrunk):
    """A student template with only the required members: num_blocks, forward_until, block."""

    def __init__(self, chain):
        super().__init__()
        self.chain = chain
        self.num_blocks = len(chain)

    def forward_until(self, x, n):
        side = {}
        return _run(self.chain[:n], x, side), side

    def block(self, n):
        return self.chain[n - 1]


class ForeignTeacher(BlockNetwork):
    """Four conv blocks and a 1x1 head: the required members only, plus ``as_trunk`` if asked."""

    def __init__(self, task, out_channels, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.chain = nn.ModuleList([_Conv(3, 4)] + [_Conv(4, 4) for _ in range(3)])
        self.head = nn.Conv2d(4, out_channels, 1)
        self.num_blocks = 4
        self.tasks = {task.name: task}  # a plain attribute is enough

    def forward_until(self, x, n):
        side = {}
        return _run(self.chain[:n], x, side), side

    def forward_from(self, features, n, side):
        out = self.head(_run(self.chain[n:], features, dict(side)))
        return F.normalize(out, dim=1) if out.shape[1] == 3 else out

    def tail(self, n):
        return copy.deepcopy(self)  # holding more than blocks n+1..N is allowed


class SeedingTeacher(ForeignTeacher):
    def as_trunk(self):
        return _Trunk(copy.deepcopy(self.chain))


def _foreign_teachers(first=SeedingTeacher):
    return {"seg": first(get_task("segmentation"), 5, seed=1).eval(),
            "normal": ForeignTeacher(get_task("normals"), 3, seed=2).eval()}


def test_a_foreign_teacher_passes_check_teachers():
    teachers = _foreign_teachers()
    assert check_teachers(teachers) == teachers


def test_foreign_teachers_are_amalgamated_for_a_few_steps():
    torch.manual_seed(0)
    am = Amalgamator(_foreign_teachers(), progress=False)
    assert isinstance(am.student, _Trunk)
    loader = tiny_loader(n=8, batch=4)
    table = am.fit(loader, 1, max_steps_per_block=2, final_loss_images=4)
    assert set(table) == {"seg", "normal"} and all(sorted(row) == [1, 2, 3, 4] for row in table.values())
    points = am.branch_out()
    assert all(3 <= p <= 4 for p in points.values())  # Eq. 7's candidates: the second half
    net = am.finetune(loader, 1, max_steps=2)
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 3, 32, 40))
    assert out["seg"].shape == (2, 5, 32, 40) and out["normal"].shape == (2, 3, 32, 40)


def test_random_init_uses_the_templates_default_reset():
    am = Amalgamator(_foreign_teachers(), init="random", progress=False)
    teacher = am.teachers["seg"].chain[0].conv.weight
    assert not torch.equal(am.student.block(1).conv.weight, teacher)


class _NoSuffix(BlockNetwork):
    num_blocks = 4

    @property
    def tasks(self):
        return {"seg": get_task("segmentation")}

    def forward_until(self, x, n):
        return x, {}


def test_a_teacher_missing_a_method_gets_an_error_naming_it():
    with pytest.raises(TypeError, match=r"teachers\['seg'\] .* does not implement forward_from, tail$"):
        check_teachers({"seg": _NoSuffix()})


def test_a_module_that_does_not_subclass_the_interface_is_refused():
    class DuckTyped(nn.Module):  # has every required member, but none of the interface's defaults
        num_blocks, tasks = 4, {}
        forward_until = forward_from = tail = ForeignTeacher.forward_until

    with pytest.raises(TypeError, match=r"a pyamalgam.models.BlockNetwork\); DuckTyped does not subclass it"):
        check_teachers({"seg": DuckTyped()})


def test_the_student_source_must_provide_as_trunk():
    with pytest.raises(ValueError, match=r"init='teacher': teachers\['seg'\] cannot be copied .* as_trunk\(\)"):
        Amalgamator(_foreign_teachers(first=ForeignTeacher), progress=False)
    teachers = {"seg": ForeignTeacher(get_task("segmentation"), 5, seed=1),
                "normal": SeedingTeacher(get_task("normals"), 3, seed=2)}
    am = Amalgamator(teachers, init="normal", progress=False)  # another teacher seeds the student
    assert isinstance(am.student, _Trunk)


def test_a_student_template_missing_block_is_refused():
    class NoBlocks(BlockTrunk):
        num_blocks = 4

        def forward_until(self, x, n):
            return x, {}

    class Seeds(ForeignTeacher):
        def as_trunk(self):
            return NoBlocks()

    teachers = {"seg": Seeds(get_task("segmentation"), 5, seed=1)}
    with pytest.raises(TypeError, match=r"as_trunk\(\) must return a student template .* does not implement block$"):
        Amalgamator(teachers, progress=False)

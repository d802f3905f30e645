"""Teachers whose block shapes differ from the student's: connectors after the channel coding
(issue 13). The student copies the first teacher (Step 1); every other teacher whose features or
float side information differ in channels or resolution gets a 1x1 connector (and a resize)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_loader, tiny_net, tiny_teachers
from pyamalgam.amalgamation.connectors import BlockConnector, ConnectedCoding, ConnectedTail, ConnectedTeacher
from pyamalgam.losses import get_task
from pyamalgam.models import BlockNetwork, BlockTrunk, unet_vgg
from pyamalgam.models.protocol import count_parameters
from pyamalgam.nn import ChannelCoding


def _unet(task, width, depth=2, seed=0):
    torch.manual_seed(seed)
    return unet_vgg(task, width=width, depth=depth, num_classes=5, num_bins=8).eval()


# ---------------------------------------------------------------- the homogeneous path is unchanged


def test_homogeneous_teachers_get_exactly_the_codings_built_before_connectors():
    teachers = tiny_teachers("segmentation", "depth")
    torch.manual_seed(5)
    am = Amalgamator(teachers, progress=False)
    torch.manual_seed(5)  # what the Amalgamator built before connectors existed, draw for draw
    shapes = [(4,), (8,), (16,), (8,), (4,), (4,)]
    expected = nn.ModuleDict({str(n): nn.ModuleDict({k: ChannelCoding(shapes[n - 1][0], 4, gate=0.95) for k in teachers})
                              for n in range(1, 7)})
    assert all(type(c) is ChannelCoding for row in am.codings.values() for c in row.values())
    got, want = am.codings.state_dict(), expected.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(am.teachers[k] is teachers[k] for k in teachers)  # not wrapped
    am.branch_out(points={"seg": 5, "depth": 6})
    for br in am.target_net.branches.values():
        assert type(br.coding) is ChannelCoding and not isinstance(br.tail, ConnectedTail)


# ---------------------------------------------------------------- structure


def test_wider_teacher_gets_feature_and_skip_connectors():
    teachers = {"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 8, seed=1)}
    am = Amalgamator(teachers, progress=False)
    assert am.student.channels == (4, 8)  # Step 1: a copy of the first teacher
    for n, (student, teacher) in enumerate([(4, 8), (8, 16), (4, 8), (4, 8)], start=1):
        assert type(am.codings[str(n)]["seg"]) is ChannelCoding
        coding = am.codings[str(n)]["depth"]
        assert isinstance(coding, ConnectedCoding) and coding.coding.channels == student
        assert coding.connector.conv.conv.weight.shape == (teacher, student, 1, 1)
        assert coding.side_keys == ([f"skip{n}"] if n <= 2 else [])  # encoder blocks write the skips
    wrapped = am.teachers["depth"]
    assert isinstance(wrapped, ConnectedTeacher) and wrapped.teacher is teachers["depth"]
    assert wrapped._maps["skip1"] is am.codings["1"]["depth"].side[0]  # refers to the trained modules
    assert count_parameters(wrapped) == count_parameters(teachers["depth"])  # no parameter of its own
    assert am.parameter_report()["teachers"]["depth"] == count_parameters(teachers["depth"])


def test_a_branch_holds_coding_connector_side_connectors_and_the_teachers_suffix():
    teachers = {"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 8, seed=1)}
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 3, "depth": 3})
    branch = am.target_net.branches["depth"]
    assert isinstance(branch.coding, ConnectedCoding) and len(branch.coding.side) == 0
    assert isinstance(branch.tail, ConnectedTail) and branch.tail.side_keys_mapped == ["skip1", "skip2"]
    assert branch.tail.side[0] is not am.codings["1"]["depth"].side[0]  # a copy, fine-tuned with the TargetNet
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        out = am.target_net.eval()(x)
    assert out["depth"].shape == (1, 16, 20) and out["seg"].shape == (1, 5, 16, 20)


@pytest.mark.parametrize("objective", ["prediction", "feature"])
def test_a_heterogeneous_run_trains_every_connector(objective):
    teachers = {"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 8, seed=1)}
    am = Amalgamator(teachers, objective=objective, progress=False)
    before = copy.deepcopy(am.codings.state_dict())
    loader = tiny_loader(n=4, batch=2)
    am.fit(loader, 1, final_loss_images=2)
    after = am.codings.state_dict()
    side = [k for k in after if ".side." in k]
    moved = [k for k in after if "connector" in k or k in side]
    changed = {k for k in moved if not torch.equal(before[k], after[k])}
    # Eq. 5 has no signal for the side connectors (they act only inside the teacher's suffix)
    expect = set(moved) - (set(side) if objective == "feature" else set())
    assert expect and changed == expect
    assert all(torch.isfinite(torch.tensor(v)).all() for row in am.loss_table.values() for v in row.values())


# ---------------------------------------------------------------- resolution: a resizing connector


class _Conv(nn.Module):
    def __init__(self, c_in, c_out, resize=1.0):
        super().__init__()
        self.conv, self.resize = nn.Conv2d(c_in, c_out, 3, padding=1), resize

    def forward(self, x, side):
        if self.resize != 1.0:
            x = F.interpolate(x, scale_factor=self.resize, mode="nearest") if self.resize > 1 else F.max_pool2d(x, 2)
        return F.relu(self.conv(x))


class _Trunk(BlockTrunk):
    def __init__(self, chain):
        super().__init__()
        self.chain, self.num_blocks, self.size_divisor = chain, len(chain), 2

    def forward_until(self, x, n):
        for b in self.chain[:n]:
            x = b(x, {})
        return x, {}

    def block(self, n):
        return self.chain[n - 1]


class _Teacher(BlockNetwork):
    """Four conv blocks without side information; ``pooled`` halves the resolution of block 2."""

    size_divisor = 2

    def __init__(self, task, out, width, pooled, seed):
        super().__init__()
        torch.manual_seed(seed)
        r = (0.5, 2.0) if pooled else (1.0, 1.0)
        self.chain = nn.ModuleList([_Conv(3, width), _Conv(width, width, r[0]), _Conv(width, width, r[1]),
                                    _Conv(width, width)])
        self.head, self.num_blocks, self.tasks = nn.Conv2d(width, out, 1), 4, {task.name: task}

    def forward_until(self, x, n):
        return _Trunk(self.chain).forward_until(x, n)

    def forward_from(self, features, n, side):
        for b in self.chain[n:]:
            features = b(features, side)
        return self.head(features)

    def tail(self, n):
        return copy.deepcopy(self)

    def as_trunk(self):
        return _Trunk(copy.deepcopy(self.chain))


@pytest.mark.parametrize("first_pooled", [True, False])
def test_teachers_at_another_resolution_get_a_resizing_connector(first_pooled):
    task = get_task("segmentation")
    teachers = {"a": _Teacher(task, 5, 4, first_pooled, seed=1).eval(),
                "b": _Teacher(task, 3, 6, not first_pooled, seed=2).eval()}
    am = Amalgamator(teachers, progress=False)
    connector = am.codings["2"]["b"].connector
    assert connector.scale == ((2, 2) if first_pooled else (0.5, 0.5))
    assert am.codings["1"]["b"].connector.scale is None  # block 1: channels only
    loader = tiny_loader(n=4, batch=2)
    am.fit(loader, 1, final_loss_images=2)
    am.branch_out(points={"a": 2, "b": 2})
    net = am.finetune(loader, 1)
    with torch.no_grad():
        out = net.eval()(torch.rand(1, 3, 32, 40))
    assert out["a"].shape == (1, 5, 32, 40) and out["b"].shape == (1, 3, 32, 40)


# ---------------------------------------------------------------- BlockConnector against float64 references


def _bilinear_x2(x):
    """Independent 2x bilinear up-sampling (align_corners=False), separable, float64."""
    def axis(t, dim):
        n = t.shape[dim]
        src = ((torch.arange(2 * n, dtype=torch.float64) + 0.5) / 2 - 0.5).clamp(min=0)
        i0 = src.floor().long()
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).view([-1 if d == dim else 1 for d in range(t.dim())])
        return t.index_select(dim, i0) * (1 - w) + t.index_select(dim, i1) * w
    return axis(axis(x, 2), 3)


@pytest.mark.parametrize("student, teacher", [((3, 6, 10), (5, 3, 5)), ((1, 3, 5), (2, 6, 10)), ((4, 5, 7), (1, 5, 7))])
def test_block_connector_against_a_float64_reference(student, teacher):
    torch.manual_seed(0)
    conn = BlockConnector(student, teacher).double()
    x = torch.randn(2, *student, dtype=torch.float64)
    conv = conn.conv.conv
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)
    if teacher[1] < student[1]:  # area: the mean of each 2x2 cell
        y = y.reshape(2, teacher[0], teacher[1], 2, teacher[2], 2).mean(dim=(3, 5))
    elif teacher[1] > student[1]:
        y = _bilinear_x2(y)
    torch.testing.assert_close(conn(x), y, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(conn, (x[:1].clone().requires_grad_(True),))


def test_block_connector_refuses_what_it_cannot_map():
    conn = BlockConnector((4, 4, 4), (4, 2, 2))
    assert isinstance(conn.conv, nn.Identity)  # equal channels: no convolution
    with pytest.raises(ValueError, match=r"size \(5, 4\) cannot be resized by 1/2 to whole pixels"):
        conn(torch.rand(1, 4, 5, 4))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, H, W\), got \(1, 3, 4, 4\)"):
        conn(torch.rand(1, 3, 4, 4))


# ---------------------------------------------------------------- what cannot work is refused


def test_pooling_indices_of_another_width_are_refused():
    teachers = {"seg": tiny_net("segmentation"), "depth": tiny_net("depth", width=1 / 8)}
    with pytest.raises(ValueError, match=r"block 1: .* side information 'pool1' \(torch.int64 .* cannot be mapped "
                                         r"by a connector; .* \(U-Net skips, e.g. unet_vgg\)"):
        Amalgamator(teachers)


def test_different_block_counts_are_refused_whatever_the_widths():
    with pytest.raises(ValueError, match=r"teachers must have the same number of blocks: teachers\['depth'\] has 6"):
        Amalgamator({"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 8, depth=3)})


def test_a_target_net_of_other_shapes_cannot_teach_again():
    am = Amalgamator({"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 16, seed=1)}, progress=False)
    am.branch_out(points={"seg": 3, "depth": 4})
    with pytest.raises(ValueError, match=r"block 1: teachers\['t2'\] gives features \(4, 16, 16\) .* gives \(8, 16, 16\)"
                                         r"; a multi-stream teacher \(a TargetNet\) must share"):
        Amalgamator({"normal": _unet("normals", 1 / 8, seed=2), "t2": am.target_net}, probe_size=(16, 16))


# ---------------------------------------------------------------- the measured bar


@pytest.fixture(scope="module")
def trained_teachers():
    from pyamalgam.data import SyntheticScenes
    from pyamalgam.teachers import train_teacher

    train = SyntheticScenes("train", size=32, resolution=(32, 32))
    kw = dict(steps=40, depth=3, decoder="concat", progress=False, batch_size=8, lr=3e-3, num_bins=16)
    return {"seg": train_teacher("seg", train, width=1 / 8, **kw).net,
            "depth": train_teacher("depth", train, width=1 / 4, seed=1, **kw).net}


def _agreement(net, teachers, images):
    with torch.no_grad():
        out = net.eval()(images)
        return {k: float(t.task.loss(out[k], t.task.target(t(images)))) for k, t in teachers.items()}


@pytest.mark.slow  # about 15 s on two loaded cores
def test_a_target_net_of_two_widths_agrees_with_both_teachers(trained_teachers):
    from pyamalgam.data import SyntheticScenes

    teachers = trained_teachers
    assert teachers["seg"].channels == (8, 16, 32) and teachers["depth"].channels == (16, 32, 64)
    pool = SyntheticScenes("unlabelled", size=32, resolution=(32, 32))
    loader = DataLoader(pool, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    held_out = torch.stack([SyntheticScenes("test", size=8, resolution=(32, 32))[i]["image"] for i in range(8)])
    points = {"seg": 4, "depth": 4}  # the first decoder block
    torch.manual_seed(0)
    untrained = _agreement(Amalgamator(teachers, init="random", progress=False)._build_target(points), teachers, held_out)
    am = Amalgamator(teachers, optimizer="adam", lr=3e-3, progress=False)
    fresh = _agreement(am._build_target(points), teachers, held_out)  # random connectors into the 1/4 teacher
    am.fit(loader, 1, final_loss_images=8)
    am.branch_out(points=points)
    after = _agreement(am.finetune(loader, 8), teachers, held_out)
    for name in after:  # measured on this machine: 0.10x (seg), 0.26x (depth)
        assert after[name] < 0.5 * untrained[name], (name, untrained, after)
    assert after["depth"] < 0.5 * fresh["depth"], (fresh, after)  # measured: 0.13x


def test_a_resumed_heterogeneous_run_restores_the_connectors(tmp_path):
    def make():
        teachers = {"seg": _unet("segmentation", 1 / 16), "depth": _unet("depth", 1 / 8, seed=1)}
        return Amalgamator(teachers, checkpoint_dir=tmp_path, progress=False)

    loader = tiny_loader(n=4, batch=2)
    first = make()
    first.fit(loader, 1, final_loss_images=2)
    first.branch_out(points={"seg": 3, "depth": 3})
    done = first.finetune(loader, 1)
    trained = first.codings["1"]["depth"].side[0].conv.conv.weight.clone()
    del first
    again = make()
    side = again.codings["1"]["depth"].side[0]
    initial = side.conv.conv.weight.clone()
    net = again.finetune(loader, 1, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), done.state_dict().values()))
    assert not torch.equal(initial, trained) and torch.equal(side.conv.conv.weight, trained)
    assert again.teachers["depth"]._maps["skip1"] is side  # the wrapper reads the restored module

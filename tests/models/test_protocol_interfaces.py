"""The two interfaces of the block protocol and the chain that implements both."""
import pytest
import torch

from pyamalgam import models
from pyamalgam.models import (
    BlockNetwork,
    BlockTrunk,
    SequentialBlockNet,
    block_shapes,
    missing_members,
    segnet_vgg,
)


def tiny():
    torch.manual_seed(0)
    return segnet_vgg("segmentation", width=1 / 16, depth=3, num_classes=5, num_bins=8).eval()


def test_a_chain_is_a_teacher_and_its_trunk_a_student_template():
    net = tiny()
    trunk = net.as_trunk()
    assert isinstance(net, BlockNetwork) and missing_members(net, BlockNetwork) == []
    assert isinstance(trunk, BlockTrunk) and missing_members(trunk, BlockTrunk) == []
    assert all(trunk.block(n) is trunk.blocks[str(n)] for n in range(1, 7))
    assert net.tail(4).block(4) is None and net.tail(4).block(5) is not None  # cut away / kept


def test_missing_members_names_what_the_interface_requires():
    class Nothing(torch.nn.Module):
        pass

    assert missing_members(Nothing(), BlockNetwork) == ["num_blocks", "tasks", "forward_until", "forward_from", "tail"]
    assert missing_members(Nothing(), BlockTrunk) == ["num_blocks", "forward_until", "block"]


def test_the_defaults_follow_from_the_required_members():
    net = tiny()
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        generic = BlockNetwork.feature_shapes(net, x)  # the N-prefix default, next to the one-pass override
        assert block_shapes(net, x) == generic
        assert torch.equal(BlockNetwork.forward(net, x), net(x))
    assert net.side_keys(x) == {"pool1", "pool2"}
    assert not net.multi_output and dict(net.task_weights) == {}


def test_the_old_name_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="use SequentialBlockNet"):
        assert models.BlockNet is SequentialBlockNet

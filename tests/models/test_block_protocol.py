"""The block protocol and the reference VGG encoder-decoders (paper 001, §3-§5.1.1)."""
import pytest
import torch

from pyamalgam.models import (
    BlockNet,
    DepthHead,
    NormalHead,
    block_shapes,
    count_parameters,
    segnet_vgg,
    unet_vgg,
)

TASKS = ["segmentation", "depth", "normals"]


def tiny(factory, task, depth=3):
    torch.manual_seed(0)
    return factory(task, width=1 / 16, depth=depth, num_classes=5, num_bins=8).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory", [segnet_vgg, unet_vgg])
@pytest.mark.parametrize("task", TASKS)
def test_replacing_block_n_by_its_own_features_reproduces_the_prediction(factory, task, images):
    net = tiny(factory, task)
    with torch.no_grad():
        expected = net(images)
        for n in range(0, net.num_blocks + 1):
            features, side = net.forward_until(images, n)
            assert torch.equal(net.forward_from(features, n, side), expected), f"block {n}"


@pytest.mark.parametrize("factory", [segnet_vgg, unet_vgg])
def test_tail_holds_only_the_suffix_and_predicts_the_same(factory, images):
    net = tiny(factory, "depth")
    with torch.no_grad():
        expected = net(images)
        for n in range(net.num_blocks + 1):
            tail = net.tail(n)
            features, side = net.forward_until(images, n)
            assert torch.equal(tail.forward_from(features, n, side), expected)
            kept = sum(count_parameters(net.blocks[str(i)]) for i in range(n + 1, net.num_blocks + 1))
            assert count_parameters(tail) == kept + count_parameters(net.head)


def test_forward_from_leaves_the_callers_side_information_alone(images):
    net = tiny(segnet_vgg, "segmentation")
    features, side = net.forward_until(images, 2)
    before = dict(side)
    net.forward_from(features, 2, side)
    assert side.keys() == before.keys() and all(side[k] is before[k] for k in side)


def test_block_shapes_are_symmetric_in_resolution(images):
    net = tiny(segnet_vgg, "segmentation")
    shapes = block_shapes(net, images)
    assert shapes == [(4, 32, 40), (8, 16, 20), (16, 8, 10), (8, 8, 10), (4, 16, 20), (4, 32, 40)]
    for n in range(1, 7):
        assert shapes[n - 1][1:] == shapes[6 - n][1:]
    assert net.size_divisor == 8


def test_side_information_kinds(images):
    _, seg_side = tiny(segnet_vgg, "segmentation").forward_until(images, 6)
    _, unet_side = tiny(unet_vgg, "segmentation").forward_until(images, 6)
    assert sorted(seg_side) == ["pool1", "pool2"]  # pool3 stays inside the deepest decoder block
    assert sorted(unet_side) == ["skip1", "skip2", "skip3"]


def test_indivisible_input_is_refused_with_the_divisor():
    net = tiny(segnet_vgg, "segmentation")
    with pytest.raises(ValueError, match=r"33x40.*divisible by 8"):
        net(torch.rand(1, 3, 33, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 32, 40))


def test_bad_block_index_is_refused(images):
    net = tiny(segnet_vgg, "segmentation")
    with pytest.raises(ValueError, match=r"block index n must be an int in \[0, 6\], got 7"):
        net.forward_until(images, 7)
    with pytest.raises(ValueError, match="block 2 was cut away"):
        net.tail(3).forward_from(torch.zeros(1), 1, {})


def test_heads_decode_depth_and_normalise_normals(images):
    with torch.no_grad():
        depth = tiny(segnet_vgg, "depth")(images)
        normals = tiny(segnet_vgg, "normals")(images)
        seg = tiny(segnet_vgg, "segmentation")(images)
    head = DepthHead(4, num_bins=8, max_depth=10.0)
    assert depth.shape == (2, 32, 40) and head.bin_size == 1.25
    assert depth.min() >= 1.25 - 1e-5 and depth.max() <= 10.0 + 1e-5  # Eq. 2 with bins 1..N_d
    assert normals.shape == (2, 3, 32, 40)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 32, 40))
    assert seg.shape == (2, 5, 32, 40)
    assert isinstance(NormalHead(4)(torch.rand(1, 4, 2, 2)), torch.Tensor)


def test_full_size_parameter_count_matches_the_docstring():
    assert count_parameters(segnet_vgg("segmentation", num_classes=40)) == 29_503_144


def test_tasks_are_declared(images):
    assert tiny(segnet_vgg, "segmentation").task.name == "seg"
    assert tiny(segnet_vgg, "depth").task.name == "depth"
    assert tiny(segnet_vgg, "normals").task.name == "normal"
    assert segnet_vgg("depth", width=1 / 16, depth=3, name="d").task.name == "d"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 0}, r"depth must be an int in \[1, 5\], got 0"),
        ({"depth": 6}, r"depth must be an int in \[1, 5\], got 6"),
        ({"width": 0}, "width must be > 0"),
        ({"decoder": "bilinear"}, "decoder must be 'unpool' or 'concat'"),
    ],
)
def test_bad_factory_arguments(kwargs, message):
    from pyamalgam.models import VGGEncoderDecoder

    with pytest.raises(ValueError, match=message):
        VGGEncoderDecoder("segmentation", **kwargs)


def test_unknown_task_and_custom_task_without_head():
    with pytest.raises(ValueError, match="unknown task 'albedo'"):
        segnet_vgg("albedo")
    with pytest.raises(ValueError, match="has no default head; pass head="):
        segnet_vgg(lambda p, t: (p - t).abs().mean(), width=1 / 16, depth=3)


def test_a_user_network_speaks_the_protocol_with_plain_blocks(images):
    class Scale(torch.nn.Module):  # a side-free block ignores ``side``
        def forward(self, x, side):
            return 2 * x

    net = BlockNet([Scale(), Scale()], torch.nn.Identity(), "depth")
    features, side = net.forward_until(images, 1)
    assert torch.equal(net.forward_from(features, 1, side), 4 * images)
    assert net.tasks["depth"].name == "depth"

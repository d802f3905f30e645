"""The hard-sharing multi-task networks: one shared encoder (one set of weights, gradients from
every task), per-task decoders and heads, the block protocol, the S paths, and clear errors for
bad task lists."""
import pytest
import torch
from _mtl_cases import BINS, TASKS, H, K, W, tiny_mtl

from pyamalgam.models import BlockNetwork, protocol_gap
from pyamalgam.models.multitask import (
    MultiTaskNet,
    multitask_segnet,
    multitask_unet,
    resolve_tasks,
)


@pytest.mark.parametrize("decoder", ["unpool", "concat"])
def test_one_shared_encoder_gets_gradients_from_every_task(decoder):
    net = tiny_mtl(decoder=decoder).train()
    encoder = {id(p) for p in net.encoder.parameters()}
    every = [id(p) for p in net.parameters()]
    assert len(every) == len(set(every))  # each tensor once: the encoder is not copied per task
    for name in TASKS:  # no decoder or head holds an encoder tensor
        assert not encoder & {id(p) for p in net.decoders[name].parameters()}
    x = torch.rand(2, 3, H, W)
    for name in TASKS:
        net.zero_grad(set_to_none=True)
        out = net(x)[name]
        out.float().pow(2).mean().backward()
        first_conv = net.encoder["1"].convs[0].weight
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, name
        for other in TASKS:  # only the task's own decoder and head get a gradient
            grads = [p.grad for p in net.decoders[other].parameters()] + [p.grad for p in net.heads[other].parameters()]
            assert all(g is None for g in grads) == (other != name), (name, other)


def test_outputs_of_every_task_and_shapes():
    net = tiny_mtl(shallow=True).eval()
    x = torch.rand(1, 3, H, W)
    out = net(x)
    assert list(out) == list(TASKS)
    assert out["seg"].shape == (1, K, H, W) and out["depth"].shape == (1, H, W) and out["normal"].shape == (1, 3, H, W)
    assert torch.allclose(out["normal"].norm(dim=1), torch.ones(1, H, W), atol=1e-5)
    s = net.forward_shallow(x)
    assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in out.items()}
    tr = net.forward_train(x)
    assert tr["kd"]["depth"].shape == (1, BINS, H, W)  # depth distils its bin logits
    assert tr["encoded"].shape[1] == net.encoded_channels and tr["encoded"].shape[-1] == W // 2


@pytest.mark.parametrize("decoder", ["unpool", "concat"])
def test_block_protocol_halves_and_tails_agree_with_forward(decoder):
    net = tiny_mtl(decoder=decoder, depth=3, shallow=True).eval()
    assert protocol_gap(net, BlockNetwork) is None and net.multi_output and net.num_blocks == 6
    x = torch.rand(2, 3, H, W)
    ref = net(x)
    for n in range(net.num_blocks + 1):
        feats, side = net.forward_until(x, n)
        assert isinstance(feats, dict) == (n > net.depth)
        for got in (net.forward_from(feats, n, side), net.tail(n).forward_from(feats, n, side)):
            assert all(torch.equal(got[k], ref[k]) for k in ref), n
    trunk = net.as_trunk()
    assert torch.equal(trunk.forward_until(x, 6)[0], net.forward_until(x, 6)[0]["seg"])
    with pytest.raises(ValueError, match=r"block index n must be an int in \[4, 6\], got 1"):
        net.tail(4).forward_from(torch.rand(2, 4, 4, 6), 1, {})


def test_any_subset_of_tasks_and_aliases():
    net = multitask_segnet(["normals", "segmentation"], width=1 / 16, depth=2, num_classes=3)
    assert list(net.tasks) == ["normal", "seg"] and set(net.decoders) == {"normal", "seg"}
    assert list(multitask_unet(("depth",), width=1 / 16, depth=2).tasks) == ["depth"]


def test_bad_task_lists_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'sementation'"):
        MultiTaskNet(("seg", "sementation"), width=1 / 16, depth=2)
    with pytest.raises(ValueError, match="'seg' is listed twice"):
        MultiTaskNet(("seg", "segmentation"), width=1 / 16, depth=2)
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskNet((), width=1 / 16, depth=2)
    with pytest.raises(TypeError, match="sequence of task names"):
        resolve_tasks("seg")
    with pytest.raises(ValueError, match="must be divisible by 4"):
        tiny_mtl()(torch.rand(1, 3, 18, 24))
    net = tiny_mtl().eval()
    with pytest.raises(RuntimeError, match="no S paths"):
        net.forward_shallow(torch.rand(1, 3, H, W))
    feats, side = net.forward_until(torch.rand(1, 3, H, W), 3)
    with pytest.raises(KeyError, match=r"lack the stream\(s\) \['normal'\]"):
        net.forward_from({k: v for k, v in feats.items() if k != "normal"}, 3, side)

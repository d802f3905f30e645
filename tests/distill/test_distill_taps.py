"""Feature taps: block taps are forward_until's features and the pass still gives net(x); module
taps (forward hooks) equal a manual forward; hooks never outlive a pass; clear errors."""
import pytest
import torch
from torch import nn

from _distill_cases import nets
from pyamalgam.distill import OUTPUT, Tap, TapRunner, parse_tap
from pyamalgam.models import SequentialBlockNet

X = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(5))  # odd-ish: 24 = 3 * 8


@pytest.fixture(scope="module")
def net():
    return nets()[0].eval()


@pytest.mark.parametrize("blocks", [[1], [3], [6], [2, 5], [1, 4, 6]])
def test_block_taps_are_forward_until_and_the_pass_is_net_x(net, blocks):
    runner = TapRunner(net, [Tap("block", n) for n in blocks], "teacher")
    with torch.no_grad():
        out, feats = runner.run(X)
        assert torch.equal(out, net(X))  # one pass, the same arithmetic as forward
        for n in blocks:
            assert torch.equal(feats[f"block:{n}"], net.forward_until(X, n)[0])
    assert sorted(feats) == sorted(f"block:{n}" for n in blocks)


def test_block_tap_features_carry_the_gradient_of_the_student(net):
    student = nets()[1]
    runner = TapRunner(student, [Tap("block", 3)], "student")
    out, feats = runner.run(X)
    feats["block:3"].square().mean().backward()
    grads = [p.grad for p in student.blocks["3"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in student.head.parameters())  # only what the features depend on


def test_module_taps_equal_a_manual_forward(net):
    # blocks.1.convs.1 is a BatchNorm followed by ReLU(inplace=True): the tap keeps the BN's value
    runner = TapRunner(net, [Tap("module", "blocks.1.convs.1"), Tap("module", "head.conv")], "teacher")
    with torch.no_grad():
        out, feats = runner.run(X)
        bn = net.blocks["1"].convs[1](net.blocks["1"].convs[0](X))
        head = net.head.conv(net.forward_until(X, net.num_blocks)[0])
        assert torch.equal(out, net(X))
    assert (bn < 0).any()  # so the in-place ReLU would have changed it
    assert torch.equal(feats["module:blocks.1.convs.1"], bn)
    assert torch.equal(feats["module:head.conv"], head)


def test_block_and_module_taps_in_one_pass(net):
    runner = TapRunner(net, [Tap("block", 2), Tap("module", "blocks.4.convs.0")], "teacher")
    with torch.no_grad():
        out, feats = runner.run(X)
        f3 = net.forward_until(X, 3)
        manual = net.blocks["4"].convs[0](_deepest_input(net, X))
    assert torch.equal(out, net(X).detach())
    assert torch.equal(feats["block:2"], net.forward_until(X, 2)[0].detach())
    assert torch.equal(feats["module:blocks.4.convs.0"], manual) and f3 is not None


def _deepest_input(net, x):
    # block 4 of a depth-3 SegNet: the deepest pooling, then unpooling with its indices
    feat, side = net.forward_until(x, 3)
    pooled, idx = torch.nn.functional.max_pool2d(feat, 2, 2, return_indices=True)
    return torch.nn.functional.max_unpool2d(pooled, idx, 2, 2)


def test_hooks_are_removed_after_a_pass_and_after_an_error(net):
    runner = TapRunner(net, [Tap("module", "head.conv")], "teacher")
    with torch.no_grad():
        runner.run(X)
    assert not any(m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError):  # H not divisible by 8: the network refuses inside the pass
        runner.run(X[:, :, :30])
    assert not any(m._forward_hooks for m in net.modules())


def test_unknown_module_lists_close_names(net):
    with pytest.raises(ValueError, match=r"no submodule 'head\.cnv'.*'head\.conv'"):
        TapRunner(net, [Tap("module", "head.cnv")], "teacher")


def test_block_tap_errors(net):
    with pytest.raises(ValueError, match=r"has blocks 1\.\.6"):
        TapRunner(net, [Tap("block", 7)], "teacher")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(TypeError, match="block protocol.*'module', name"):
        TapRunner(plain, [Tap("block", 1)], "student")


def test_a_module_that_runs_twice_is_refused():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Conv2d(3, 3, 1), relu)
    with pytest.raises(ValueError, match="ran 2 times"):
        TapRunner(net, [Tap("module", "1")], "student").run(X)


def test_an_inconsistent_block_protocol_is_caught_by_check_forward():
    class Odd(SequentialBlockNet):
        def forward(self, x):
            return super().forward(x) + 1.0

    net = Odd([_Block(), _Block()], nn.Identity()).eval()
    runner = TapRunner(net, [Tap("block", 1)], "teacher")
    with pytest.raises(ValueError, match="block protocol is inconsistent"):
        runner.check_forward(X)
    assert torch.equal(TapRunner(net, [OUTPUT], "t").check_forward(X), net(X))  # no block tap: nothing to compare


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, side):
        return self.conv(x)


@pytest.mark.parametrize("spec, error, match", [
    ("block", ValueError, "must be 'output'"),
    (("block", 0), ValueError, ">= 1"),
    (("block", 2.5), ValueError, "int >= 1"),
    (("module", ""), TypeError, "non-empty string"),
    (("layer", 3), ValueError, "must be 'output'"),
    (5, ValueError, "must be 'output'"),
])
def test_parse_tap_errors_name_the_argument(spec, error, match):
    with pytest.raises(error, match=match):
        parse_tap(spec, "terms['pa']['tap']")
    with pytest.raises(error, match=r"terms\['pa'\]"):
        parse_tap(spec, "terms['pa']['tap']")


def test_parse_tap_forms():
    assert parse_tap("output", "t") == OUTPUT
    assert parse_tap(["block", 3], "t") == Tap("block", 3)
    assert parse_tap(("module", "head.conv"), "t").key == "module:head.conv"

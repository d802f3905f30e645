"""One block-n training step: the Amalgamator vs a straightforward implementation (CPU, images/s).

    pytest bench/test_amalgamation_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

The straightforward step is what the public code does: every network runs with full autograd
(student blocks 1..n, each teacher with ``requires_grad`` on), each teacher recomputes its
prediction on the batch, and backward fills gradients for all of them; only block n and its
codings are then updated. The Amalgamator runs the frozen parts under ``no_grad`` and lets the
teacher suffixes pass gradients without weight gradients (Eq. 6, once per batch); with
``cache_targets`` each teacher also predicts each image once per run instead of once per step
(the benchmark repeats one batch, i.e. the steady state of a run that sees its images again at
every block and epoch). Each group's implementations start from the same weights and must agree
on the loss and the updated weights of one step on the same batch.
"""
import copy

import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam.amalgamation import BlockStep, weighted_sum
from pyamalgam.models import segnet_vgg

WIDTH, DEPTH, BATCH, HW = 1 / 8, 4, 4, (64, 80)  # a few channels: the CI smoke run stays fast
BLOCKS = {"encoder block 2": 2, "decoder block 6": 6}
IMPLS = ["straightforward", "amalgamator", "amalgamator+cache"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable numbers on a shared machine; both sides get the same
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers():
    out = {}
    for seed, task in enumerate(("segmentation", "depth")):
        torch.manual_seed(seed)
        out[task] = segnet_vgg(task, width=WIDTH, depth=DEPTH, num_classes=5, num_bins=8).eval()
    return {"seg": out["segmentation"], "depth": out["depth"]}


@pytest.fixture(scope="module")
def batch():
    return torch.rand(BATCH, 3, *HW, generator=torch.Generator().manual_seed(0))


def _amalgamator(teachers, cache=False):
    torch.manual_seed(0)  # the codings' initialisation: the same in every implementation
    return Amalgamator(copy.deepcopy(teachers), progress=False, cache_targets=2**28 if cache else 0)


def amalgamator_step(teachers, n, cache=False):
    """Exactly what ``Amalgamator.fit`` runs per step of block n."""
    am = _amalgamator(teachers, cache)
    module = BlockStep(am.student.blocks[str(n)], am.codings[str(n)])
    am.student.requires_grad_(False).eval()
    am.codings.requires_grad_(False)
    module.requires_grad_(True).train()
    opt = torch.optim.SGD(module.parameters(), lr=am.lr, momentum=am.momentum, weight_decay=am.weight_decay)

    def step(x):
        loss, _ = am._block_loss(n, module, x, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, module


def straightforward_step(teachers, n):
    """Every network under full autograd, every teacher's prediction recomputed in the graph."""
    am = _amalgamator(teachers)
    nets, student, codings = am.teachers, am.student, am.codings[str(n)]
    for net in (*nets.values(), student, codings):
        net.requires_grad_(True)
    student.eval()
    student.blocks[str(n)].train()
    module = BlockStep(student.blocks[str(n)], codings)
    opt = torch.optim.SGD(module.parameters(), lr=am.lr, momentum=am.momentum, weight_decay=am.weight_decay)
    everything = [p for net in (*nets.values(), student, codings) for p in net.parameters()]

    def step(x):
        features, side = student.forward_until(x, n)
        losses = {}
        for key, teacher in nets.items():
            target = teacher.task.target(teacher(x))
            prediction = teacher.forward_from(codings[key](features), n, side)
            losses[key] = teacher.task.loss(prediction, target)
        loss = weighted_sum(losses, {})
        for p in everything:
            p.grad = None
        loss.backward()
        opt.step()
        return loss.detach()

    return step, module


def _make(impl, teachers, n):
    if impl == "straightforward":
        return straightforward_step(teachers, n)
    return amalgamator_step(teachers, n, cache=impl.endswith("cache"))


@pytest.mark.parametrize("block", list(BLOCKS))
def test_same_result(teachers, batch, block):
    n = BLOCKS[block]
    runs = [_make(impl, teachers, n) for impl in IMPLS]
    losses = [step(batch) for step, _ in runs]
    states = [module.state_dict() for _, module in runs]
    for impl, loss, state in zip(IMPLS[1:], losses[1:], states[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-7, msg=f"{impl}: loss")
        for k, v in state.items():
            torch.testing.assert_close(v, states[0][k], rtol=1e-4, atol=1e-6, msg=f"{impl}: {k} after one step")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_step(benchmark, teachers, batch, block, impl):
    step, _ = _make(impl, teachers, BLOCKS[block])
    step(batch)  # warm-up (and the cache's one miss)
    benchmark.group = f"block step {block}, 2 teachers, B{BATCH} {HW[0]}x{HW[1]}, width {WIDTH}"
    benchmark.extra_info.update(impl=impl, block=BLOCKS[block], batch=BATCH)
    benchmark.pedantic(step, args=(batch,), rounds=7, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median

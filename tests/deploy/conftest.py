"""Shared fixtures of the deployment tests: tiny teachers and TargetNets, their files, a CLI."""
import argparse

import pytest
import torch

from pyamalgam import Amalgamator
from pyamalgam._testing import tiny_net

HW = (32, 32)


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def tiny_target_net(depth: int = 2, tasks=("segmentation", "depth", "normals"), points=None) -> torch.nn.Module:
    """A random TargetNet of tiny VGG teachers (width 1/16), eval mode; default points spread the
    branches over the decoder, one at N (a head-only tail)."""
    teachers = {}
    for i, task in enumerate(tasks):
        net = tiny_net(task, seed=i + 1, depth=depth)
        teachers[net.task.name] = net
    n = 2 * depth
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points=points or {key: [n, n - 1, depth + 1][i % 3] for i, key in enumerate(teachers)})
    return am.target_net.eval()


@pytest.fixture(scope="package")
def make_target_net():
    return tiny_target_net


@pytest.fixture(scope="package")
def target_net():
    return tiny_target_net()


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="package")
def images():
    return torch.rand(2, 3, *HW, generator=torch.Generator().manual_seed(5))


def run_cli(argv) -> int:
    """``pyamalgam ARGV`` through cli.main once the commands are wired in, else through the same
    parser layout and cli._run (the exit-code mapping) around the two command modules."""
    from pyamalgam import cli
    from pyamalgam._interrupts import InterruptGuard
    from pyamalgam.deploy import export_command, predict_command

    try:
        if "predict" in _commands(cli.build_parser()):
            return cli.main(argv)
        parser = argparse.ArgumentParser(prog="pyamalgam")
        sub = parser.add_subparsers(dest="command", required=True)
        export_command.add_parser(sub)
        predict_command.add_parser(sub)
        args = parser.parse_args(argv)
        with InterruptGuard() as guard:
            return cli._run(args, guard)
    except SystemExit as e:  # argparse errors and subparser.error
        return e.code


def _commands(parser) -> set:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}

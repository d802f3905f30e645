"""Shared fixtures of the amalgamation tests: tiny random teachers, a few images, one thread."""
import pytest
import torch

from pyamalgam._testing import tiny_teachers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions: thread hand-off costs more than it saves on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers():
    """Segmentation and depth teachers (seeds 1 and 2)."""
    return tiny_teachers("segmentation", "depth")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))

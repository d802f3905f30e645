"""Shared fixtures of the amalgamation tests: tiny random teachers, a few images, one thread."""
import pytest
import torch

from pyamalgam._testing import tiny_teachers, torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny convolutions: thread hand-off costs more than it saves
        yield


@pytest.fixture(scope="module")
def teachers():
    """Segmentation and depth teachers (seeds 1 and 2)."""
    return tiny_teachers("segmentation", "depth")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))

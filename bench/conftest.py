import pytest
import torch

from pyamalgam._testing import subprocess_env


def pytest_configure(config):
    # Each benchmark compiles torch.compile(reference) once; allow enough cache entries for all
    # shapes of the session instead of silently falling back to eager.
    torch._dynamo.config.cache_size_limit = 64


@pytest.fixture
def pyamalgam_env():
    return subprocess_env()

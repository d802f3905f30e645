"""One thread for the tiny networks of the multi-task tests (as tests/distill)."""
import pytest

from pyamalgam._testing import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield

"""One thread for the tiny networks of the Distiller tests (thread hand-off costs more than it
saves on a shared 2-core machine), and the helpers' folder on sys.path for child processes."""
import pytest

from pyamalgam._testing import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield

"""One thread for the tiny networks of the Distiller tests (thread hand-off costs more than it
saves on a shared 2-core machine), and the helpers' folder on sys.path for child processes."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

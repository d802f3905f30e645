import pytest

from pyamalgam._testing import subprocess_env


@pytest.fixture
def pyamalgam_env():
    return subprocess_env()

import ctypes
import ctypes.util
import os
import sys

import pytest
import torch

from pyamalgam._testing import subprocess_env

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> str:
    """Make glibc's malloc keep freed buffers of up to 32 MiB for reuse, as a caching allocator
    (jemalloc, tcmalloc; PyTorch's own on CUDA) does.

    By default glibc hands a freed multi-MB tensor back to the OS and the next call faults its
    pages in again: on a VM that costs ~3 ms per 10 MB, at random (it depends on the allocator's
    state), and swamps the kernels being compared. PYAMALGAM_BENCH_DEFAULT_MALLOC=1 keeps glibc's
    defaults. Returns what was done, for the results' metadata.
    """
    if os.environ.get("PYAMALGAM_BENCH_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc
        return "default"
    return "keep-freed (mmap threshold 32 MiB, no trim)" if ok else "default"


MALLOC = _keep_freed_memory()


def pytest_configure(config):
    # Each benchmark compiles torch.compile(reference) once; allow enough cache entries for all
    # shapes of the session instead of silently falling back to eager.
    torch._dynamo.config.cache_size_limit = 64


@pytest.fixture
def pyamalgam_env():
    return subprocess_env()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["malloc"] = MALLOC

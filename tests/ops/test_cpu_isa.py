"""The CPU kernels come in one copy per instruction set (csrc/cpu/kernels.h).

The rest of the suite tests the copy this machine picks; these tests check the choice, run the op
suite again on the baseline copy, and check the built module for AVX code outside the AVX2 copy
(which would crash on a CPU without AVX2 instead of falling back to the baseline).
"""
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyamalgam
from pyamalgam import _extension
from pyamalgam._testing import subprocess_env

HERE = Path(__file__).resolve().parent
INFO = pyamalgam.build_info()
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _python(*args, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=HERE,
                          env={**subprocess_env(), **env})


def test_build_info_names_the_instruction_set_in_use():
    compiled = INFO["cpu_isas"].split(",")
    assert compiled[0] == "base"
    assert INFO["cpu_isa"] in compiled
    assert ("avx2" in compiled) == X86


def test_aten_cpu_capability_default_selects_the_baseline_kernels():
    out = _python("-c", "import pyamalgam; print(pyamalgam.build_info()['cpu_isa'])", ATEN_CPU_CAPABILITY="default")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "base"


@pytest.mark.skipif(INFO["cpu_isa"] == "base", reason="the rest of the suite runs the baseline kernels already")
def test_the_baseline_kernels_pass_the_op_suite():
    files = ["test_ops_reference.py", "test_ops_autograd.py", "test_ops_properties.py", "test_pairwise_regimes.py"]
    # Not inductor: with ATEN_CPU_CAPABILITY=default, torch 2.14's inductor emits C++ that does not
    # compile (at::vec undeclared), with or without pyamalgam. The aot_eager backend still runs.
    out = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", "not inductor", *files,
                  ATEN_CPU_CAPABILITY="default")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert re.search(r"\d+ passed", out.stdout)


def _functions(so: str):
    """(address, mangled name, disassembly) of every function in the shared object."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    return re.findall(r"^([0-9a-f]+) <([^>\n]+)>:\n(.*?)(?=\n\n|\Z)", text, re.S | re.M)


def _local_symbols(so: str) -> set:
    """Addresses of the symbols with local binding: a compiler's private clones (.isra, .constprop,
    .cold), which only code of the same object file calls."""
    text = subprocess.run(["nm", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    return {int(addr, 16) for addr, kind, _ in (line.split(maxsplit=2) for line in text.splitlines()) if kind == "t"}


@pytest.mark.skipif(not X86 or not (shutil.which("objdump") and shutil.which("nm")), reason="x86-64 with binutils")
def test_no_shared_function_holds_avx_code_outside_the_avx2_kernels():
    """An inline function that the baseline and the AVX2 copy both instantiate (a torch or standard
    library header's) is merged into one at link time: that one must be the baseline build
    (CMakeLists.txt links the AVX2 copy last), or a CPU without AVX2 would crash in it."""
    so = _extension._C.__file__
    if not subprocess.run(["nm", so], capture_output=True, text=True).stdout:
        pytest.skip(f"{so} is stripped (pyproject.toml keeps symbols: was it built another way?)")
    vex = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\s", re.M)  # VEX-encoded (AVX) instructions all start with v
    local = _local_symbols(so)
    in_avx2, shared = 0, []
    for addr, name, body in _functions(so):
        # Anything in namespace pyamalgam::cpu::avx2, or instantiated with its types (the OpenMP
        # outlined bodies of parallel_for, their .cold parts), names it in its mangled name.
        if "9pyamalgam3cpu4avx2" in name:
            in_avx2 += "%ymm" in body
        elif vex.search(body) and int(addr, 16) not in local:
            shared.append(name)
    assert in_avx2 > 0, "the AVX2 copy of the kernels holds no 256-bit code: was it compiled with -mavx2?"
    assert not shared, f"AVX code in functions the baseline code may call: {shared[:5]}"

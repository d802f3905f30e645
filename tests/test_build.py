"""The build records what it was compiled with, and a torch mismatch is refused with a remedy."""
import pytest
import torch

import pyamalgam
from pyamalgam import _extension


def test_build_info():
    info = pyamalgam.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    assert (info["cuda_version"] is None) != info["with_cuda"]


def test_mismatched_torch_is_refused_with_instructions():
    with pytest.raises(ImportError, match=r"compiled against torch 2\.0\.0 but is running with torch 9\.9\.9(.|\n)*--no-build-isolation"):
        _extension.check_torch_matches({"torch_version": "2.0.0"}, running="9.9.9")
    _extension.check_torch_matches({"torch_version": torch.__version__})


def test_data_and_metrics_do_not_need_the_extension(tmp_path, pyamalgam_env):
    import subprocess
    import sys

    code = "import sys, pyamalgam; import pyamalgam.data, pyamalgam.metrics; assert 'pyamalgam._C' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=pyamalgam_env)
    assert out.returncode == 0, out.stderr

"""The demo's one cache check: a stage file is reused only when it reads and its key matches."""
import torch

from pyamalgam.demo.stages import cached_stage
from pyamalgam.engine import save_checkpoint


def test_a_stage_file_is_reused_only_for_its_key(tmp_path):
    path = tmp_path / "stage.safetensors"
    assert cached_stage(path, "k") is None  # missing
    save_checkpoint(path, {"w": torch.ones(2)}, {"key": "k", "seconds": 1.5})
    tensors, meta = cached_stage(path, "k")
    assert torch.equal(tensors["w"], torch.ones(2)) and meta["seconds"] == 1.5
    assert cached_stage(path, "other") is None  # written for other settings


def test_a_torn_or_foreign_stage_file_runs_the_stage_again(tmp_path):
    path = tmp_path / "stage.safetensors"
    save_checkpoint(path, {"w": torch.ones(1000)}, {"key": "k"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn
    assert cached_stage(path, "k") is None
    path.write_bytes(b"not a checkpoint at all")
    assert cached_stage(path, "k") is None
    path.unlink()
    path.mkdir()  # not even a file
    assert cached_stage(path, "k") is None

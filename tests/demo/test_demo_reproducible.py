"""The demo's tables depend on the seed and the settings only, not on what happened to be cached."""
import shutil

import pytest

from pyamalgam.demo import demo_config, run_demo

pytestmark = pytest.mark.slow

TABLES = ("table1.md", "table1.json", "table2.md", "table2.json")


def _tiny():
    """Every stage of the full pipeline on 32x32 images, 6 blocks and a few steps each."""
    return demo_config(False, "cpu", resolution=(32, 32), width=1 / 16, depth=3, num_bins=8, train_size=16,
                       unlabelled_size=16, test_size=8, batch_size=4, teacher_steps=3, block_steps=2,
                       finetune_steps=3, probe_images=8, eval_batch=8, figure_samples=2)


def _run(out):
    run_demo(out, device="cpu", config=_tiny(), progress=False, echo=False)
    return {name: (out / name).read_bytes() for name in TABLES}


def test_same_tables_fresh_and_with_copied_data_and_teachers(tmp_path):
    first = _run(tmp_path / "a")
    assert _run(tmp_path / "b") == first  # a second fresh run
    for stage in ("data", "teachers"):  # the teachers are loaded, not trained, in this process
        shutil.copytree(tmp_path / "a" / stage, tmp_path / "c" / stage)
    assert _run(tmp_path / "c") == first
    # and a run whose amalgamation stages were partly cached: the TargetNet-3 stages recomputed
    shutil.rmtree(tmp_path / "a" / "stages" / "tn3_offline")
    (tmp_path / "a" / "stages" / "tn2" / "eq7.safetensors").unlink()
    assert _run(tmp_path / "a") == first

"""`pyamalgam demo --quick` end to end through the CLI entry point, then again from its caches."""
import json
import math
import time

import pytest

from pyamalgam.cli import main

pytestmark = pytest.mark.slow

TABLE_FILES = ("table1.md", "table1.json", "table2.md", "table2.json", "results.json")
FIGURES = ("fig5_seg_depth.png", "fig6_normals.png", "block_losses.png")


def _finite_rows(table: dict) -> None:
    for row in table["rows"]:
        assert row["params"] > 0
        for column, value in row["values"].items():
            assert value is None or math.isfinite(value), (row["label"], column, value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Two --quick runs into the same folder: (folder, first wall time, second wall time)."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]
    t0 = time.perf_counter()
    assert main(argv) == 0
    first = time.perf_counter() - t0
    tables = {name: (out / name).read_text() for name in ("table1.json", "table2.json", "table1.md", "table2.md")}
    t0 = time.perf_counter()
    assert main(argv) == 0
    second = time.perf_counter() - t0
    return out, first, second, tables


def test_quick_demo_writes_tables_and_figures(quick_run, capsys):
    out, *_ = quick_run
    for name in TABLE_FILES + FIGURES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t1, t2 = json.loads((out / "table1.json").read_text()), json.loads((out / "table2.json").read_text())
    labels = [r["label"] for r in t1["rows"]]
    assert labels[0].startswith("TeacherNet") and labels[-1].startswith("TargetNet, Eq. 7")
    # on the CPU presets the Decoder_b variants come straight from the block-wise fit
    assert labels[1:6] == [f"Decoder_b{b} (Steps 2-3)" for b in range(1, 6)]
    # every student row carries its gains over the teachers (row 0) and their mean, Δm
    for row in t1["rows"][1:] + t2["rows"][1:]:
        assert math.isfinite(row["delta_m"]) and 0 < row["params_fraction"] < 1, row["label"]
        assert row["delta"]["mIoU"] is not None, row["label"]
    assert [r["label"] for r in t2["rows"]] == ["TeacherNet (SegNet + DepthNet + NormNet)", "TargetNet-2",
                                                "TargetNet-3 offline (Eq. 8)", "TargetNet-3 online (Eq. 9)"]
    _finite_rows(t1)
    _finite_rows(t2)
    # every cell of Table 1 is measured; Table 2 lacks only TargetNet-2's normals
    assert all(v is not None for r in t1["rows"] for v in r["values"].values())
    missing = {(r["label"], c) for r in t2["rows"] for c, v in r["values"].items() if v is None}
    assert missing and all(label == "TargetNet-2" for label, _ in missing)
    # Decoder_bn branches every task at decoder block n; smaller nets the later they branch
    params = [r["params"] for r in t1["rows"][1:6]]
    assert params == sorted(params, reverse=True)
    md = (out / "table1.md").read_text()
    assert "| Decoder_b3 (Steps 2-3) |" in md and "| ref. |" in md and "Δm" in md


def test_quick_demo_rerun_reuses_stages(quick_run):
    out, first, second, tables = quick_run
    for name, text in tables.items():
        assert (out / name).read_text() == text, f"{name} changed on the cached re-run"
    results = json.loads((out / "results.json").read_text())
    trained = [name for name, t in results["timings"].items() if name not in ("evaluation", "predictions for figures",
                                                                                       "model files (models/)")]
    assert all(results["timings"][name]["cached"] for name in trained), results["timings"]
    assert second < first / 2, (first, second)

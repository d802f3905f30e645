"""Report formatting on a crafted results dict (no training)."""
import json
import math

import pytest
import torch

from pyamalgam import report

SEG = {"miou": 0.4481, "pixel_acc": 0.684, "mean_acc": 0.5}
DEPTH = {"abs_rel": 0.287, "sq_rel": 0.339, "rmse": 1.0, "delta1": 0.569, "delta2": 0.845, "delta3": 0.948}
NORMAL = {"mean": 37.88, "median": 36.96, "within_11_25": 0.236, "within_22_5": 0.45, "within_30": 0.567}


def _scaled(metrics, f):
    return {k: v * f for k, v in metrics.items()}


@pytest.fixture
def results():
    targets = {f"tn2_decoder_b{b}": {"label": f"Decoder_b{b}", "points": {"seg": 5 + b, "depth": 5 + b},
                                     "params": 40_000_000 - b * 1_000_000,
                                     "metrics": {"seg": _scaled(SEG, 1 + b / 100), "depth": _scaled(DEPTH, 1 - b / 100)}}
               for b in (1, 2, 3, 4, 5, 10)}
    targets["tn2_eq7"] = {"points": {"seg": 10, "depth": 9}, "params": 27_800_000,
                          "metrics": {"seg": SEG, "depth": DEPTH}}
    targets["tn3_offline"] = {"points": {"seg": 10, "depth": 9, "normal": 9}, "params": 30_000_000,
                              "metrics": {"seg": SEG, "depth": DEPTH, "normal": NORMAL}}
    loss_table = {"seg": {str(n): 1.0 / n for n in range(1, 11)}, "depth": {str(n): 0.1 * n for n in range(1, 11)}}
    return {
        "num_blocks": 10, "device": "cpu", "threads": 2, "seed": 0, "quick": True,
        "config": {"resolution": [64, 64], "data": "synthetic", "width": 0.0625, "finetune_steps": 10},
        "data": {"train": 96, "unlabelled": 96, "test": 32},
        "teachers": {t: {"name": n, "params": 27_800_000, "metrics": m}
                     for t, n, m in (("seg", "SegNet", SEG), ("depth", "DepthNet", DEPTH), ("normal", "NormNet", NORMAL))},
        "targets": targets,
        "amalgamations": {"tn2": {"outputs": {"seg": ["seg"], "depth": ["depth"]}, "loss_table": loss_table,
                                  "candidates": [6, 7, 8, 9, 10], "num_blocks": 10,
                                  "targets": {"eq7": {"points": {"seg": 10, "depth": 6}}}}},
    }


def test_table1_rows_in_paper_order(results):
    rows = report.table1(results)
    labels = [r["label"] for r in rows]
    assert labels[0] == "TeacherNet (SegNet + DepthNet)"
    assert labels[1:-1] == ["Decoder_b1", "Decoder_b2", "Decoder_b3", "Decoder_b4", "Decoder_b5", "Decoder_b10"]
    assert labels[-1] == "TargetNet, Eq. 7 (seg b5, depth b4)"  # absolute blocks 10, 9 of N = 10
    assert rows[0]["params"] == 2 * 27_800_000  # the teachers together, as in the paper
    assert rows[0]["metrics"] == {"seg": SEG, "depth": DEPTH}


def test_table2_rows_and_missing_normals(results):
    rows = report.table2(results)
    assert [r["label"] for r in rows] == ["TeacherNet (SegNet + DepthNet + NormNet)", "TargetNet-2",
                                          "TargetNet-3 offline (Eq. 8)"]  # no online entry in this dict
    md = report.markdown_table(rows, report.TABLE2_COLUMNS)
    lines = md.splitlines()
    assert lines[0] == ("| Method | Params | mIoU | abs rel | sq rel | mean angle | median angle | within 11.25° "
                        "| within 22.5° | within 30° | Δm |")
    assert lines[2] == ("| TeacherNet (SegNet + DepthNet + NormNet) | 83.40M | 0.448 | 0.287 | 0.339 | 37.88 | 36.96 "
                        "| 0.236 | 0.450 | 0.567 | ref. |")
    # TargetNet-2 has no normal output; it has the teachers' seg and depth numbers: gains of 0
    assert lines[3] == ("| TargetNet-2 | 27.80M (33%) | 0.448 (+0.0%) | 0.287 (+0.0%) | 0.339 (+0.0%) | – | – | – | – "
                        "| – | +0.0% |")


def test_gains_are_signed_per_metric_direction_and_averaged_into_delta_m(results):
    rows = report.table1(results)
    teacher, b2 = rows[0], rows[2]  # Decoder_b2: seg metrics x 1.02, depth metrics x 0.98
    per, dm = report.deltas(b2, teacher, report.TABLE1_COLUMNS)
    expected = {}
    for header, task, key, _ in report.TABLE1_COLUMNS:
        ours, theirs = b2["metrics"][task][key], teacher["metrics"][task][key]
        lower = key in ("abs_rel", "sq_rel")  # lower is better: a smaller error is a positive gain
        expected[header] = (theirs - ours) / theirs if lower else (ours - theirs) / theirs
    assert per == pytest.approx(expected)
    assert per["mIoU"] == pytest.approx(0.02) and per["abs rel"] == pytest.approx(0.02)
    assert per["δ<1.25"] == pytest.approx(-0.02)
    assert dm == pytest.approx(sum(expected.values()) / len(expected))
    md = report.markdown_table(rows, report.TABLE1_COLUMNS).splitlines()[4]
    assert md.startswith("| Decoder_b2 | 38.00M (68%) | 0.457 (+2.0%) | 0.698 (+2.0%) | 0.281 (+2.0%) |")
    t1 = report.format_tables(results)["table1.json"]
    assert t1["rows"][2]["delta_m"] == pytest.approx(dm) and "delta" not in t1["rows"][0]


def test_a_gain_against_a_zero_or_missing_reference_is_left_out():
    assert report.relative_gain(0.5, 0.0, "miou") is None and report.relative_gain(None, 0.5, "miou") is None
    assert report.relative_gain(float("nan"), 0.5, "abs_rel") is None
    assert report.relative_gain(40.0, 50.0, "mean") == pytest.approx(0.2)  # 10 degrees less of 50: +20%


def test_markdown_formats_params_and_non_finite():
    rows = [{"label": "a", "params": 117_541, "metrics": {"seg": {"miou": float("nan"), "pixel_acc": 0.5}}}]
    md = report.markdown_table(rows, report.TABLE1_COLUMNS[:2])
    assert md.splitlines()[-1] == "| a | 117.5k | nan | 0.500 | ref. |"


def test_format_tables_json_and_no_claims(results):
    tables = report.format_tables(results)
    t1 = tables["table1.json"]
    assert t1["columns"] == [c[0] for c in report.TABLE1_COLUMNS]
    eq7 = t1["rows"][-1]
    assert eq7["points"] == {"seg": 10, "depth": 9} and eq7["values"]["mIoU"] == SEG["miou"]
    json.dumps(tables["table1.json"]), json.dumps(tables["table2.json"])  # serialisable
    text = (tables["table1.md"] + tables["table2.md"]).lower()
    for word in ("outperform", "better", "worse", "beats", "improve", "master"):  # numbers, not verdicts
        assert word not in text
    assert "cpu (2 threads)" in text and "64x64" in text and "10 steps" in text


def _samples(n=2, h=32, w=32, classes=7):
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.rand(n, 3, h, w, generator=g), "seg": torch.randint(0, classes, (n, h, w), generator=g),
              "depth": torch.rand(n, h, w, generator=g) * 5, "normal": torch.nn.functional.normalize(
                  torch.randn(n, 3, h, w, generator=g), dim=1), "mask": torch.rand(n, h, w, generator=g) > 0.1}
    predictions = {
        "seg": {"teacher": ("SegNet", inputs["seg"].float()), "student": ("TargetNet-2", inputs["seg"].flip(-1).float())},
        "depth": {"teacher": ("DepthNet", inputs["depth"] + 0.1), "student": ("TargetNet-2", inputs["depth"][:, None])},
        "normal": {"teacher": ("NormNet", torch.randn(n, 3, h, w, generator=g)),
                   "student": ("TargetNet-3", torch.randn(n, 3, h, w, generator=g))},
    }
    return {"inputs": inputs, "predictions": predictions, "class_names": [str(i) for i in range(classes)],
            "ignore_index": 255, "depth_range": (0.0, 5.0)}


def test_write_report_files(results, tmp_path, capsys):
    written = report.write_report(tmp_path, results, _samples(), echo=True)
    assert set(written) == {"table1.md", "table2.md", "table1.json", "table2.json", "results.json",
                            "fig5_seg_depth.png", "fig6_normals.png", "block_losses.png"}
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["num_blocks"] == 10
    printed = capsys.readouterr().out
    assert "## Table 1" in printed and "## Table 2" in printed and "| Decoder_b5 |" in printed
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_write_report_without_samples(results, tmp_path):
    written = report.write_report(tmp_path, results, None, echo=False)
    assert "fig5_seg_depth.png" not in written and "block_losses.png" in written
    values = json.loads((tmp_path / "table1.json").read_text())["rows"][1]["values"]
    assert all(math.isfinite(v) for v in values.values())

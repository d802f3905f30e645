"""``pyamalgam mtl``: seed 002's Table 1 on the synthetic scenes (the micro preset, a few rows, the
five tasks, the amalgamated row), its files, and the command's argument checks."""
import argparse
import json

import pytest

from pyamalgam.multitask import command
from pyamalgam.multitask.table import AMALGAMATED, ROWS, run_table, table_config

FIVE = ("seg", "depth", "normal", "keypoints", "edges")


def test_micro_table_with_five_tasks_t_s_rows_and_the_amalgamated_row(tmp_path):
    rows = [r for r in ROWS if r.label in ("Vanilla SegNet", "Trad. K.D.", "SD-MTCNN (★★) full")]
    results = run_table(tmp_path, seeds=(0, 1), progress=False, config=table_config("micro", tasks=FIVE), rows=rows)
    got = [(r["row"], r["path"]) for r in results["rows"]]
    assert got == [("Vanilla SegNet", "T"), ("Trad. K.D.", "T"), ("SD-MTCNN (★★) full", "T"),
                   ("SD-MTCNN (★★) full", "S"), (AMALGAMATED, "T")]
    columns = {"seg/pixel_acc", "seg/miou", "depth/abs", "depth/rel", "normal/cos", "keypoints/abs", "edges/abs"}
    for row in results["rows"]:
        assert set(row["columns"]) == columns and [r["seed"] for r in row["runs"]] == [0, 1]
        assert all(s["std"] >= 0 for s in row["columns"].values())
    assert set(results["teachers"]) == set(FIVE)
    md = (tmp_path / "mtl.md").read_text()
    assert "| SD-MTCNN (★★) full | T |" in md and "|  | S |" in md and "Key abs" in md and "Edge abs" in md
    assert json.loads((tmp_path / "mtl.json").read_text())["rows"][0]["row"] == "Vanilla SegNet"
    assert (tmp_path / "mtl.png").stat().st_size > 1000


def test_table_config_errors():
    with pytest.raises(ValueError, match="unknown TableConfig field"):
        table_config("quick", stepz=3)
    with pytest.raises(ValueError, match="multiples of 2\\^depth = 8"):
        table_config("quick", resolution=(36, 36))
    with pytest.raises(ValueError, match="unknown task 'edgez'"):
        table_config("micro", tasks=("seg", "edgez"))
    with pytest.raises(ValueError, match="preset must be one of"):
        table_config("huge")
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence of distinct"):
        run_table("unused", seeds=(1, 1))


def test_command_registers_and_checks_its_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="pyamalgam")
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mtl", "--quick", "--tasks", "segmentation,normals", "--seeds", "0,2",
                              "--out", str(tmp_path)])
    assert (args.fn, args.tasks, args.seeds, args.quick) == (command.run, ("seg", "normal"), (0, 2), True)
    args.check(args)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["mtl", "--tasks", "seg,sementation"])
    assert e.value.code == 2 and "unknown task 'sementation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["mtl", "--seeds", "0,0"])

"""The ablation behind ``pyamalgam distill`` on its micro preset (a smoke test: every row, two
seeds, the table, the JSON and the figure) and the command's arguments."""
import argparse
import json

import pytest

from pyamalgam.distill import ablation
from pyamalgam.distill.ablation import ROWS, ablation_config, holistic_available, run_ablation
from pyamalgam.distill.command import add_parser, check, run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    return out, run_ablation(out, seeds=(0, 1), progress=False, config=ablation_config("micro"))


def test_every_row_of_every_student_is_run_over_the_seeds(results):
    out, r = results
    rows = r["rows"]
    assert [(x["width"], x["row"]) for x in rows] == [(w, label) for w in (1 / 8, 1 / 16) for label, _ in ROWS]
    for x in rows:
        if "skipped" in x:
            assert "ho" in x["terms"] and not holistic_available()
            continue
        assert [run["seed"] for run in x["runs"]] == [0, 1]
        assert 0 <= x["miou"] <= 1 and x["miou_std"] >= 0 and x["ms_per_step"] > 0
        assert x["miou"] == pytest.approx(sum(run["miou"] for run in x["runs"]) / 2)
        losses = x["runs"][0]["losses"]
        assert set(x["terms"]) <= set(losses) and "mc" in losses  # the row's terms, and the labels' loss
    params = {x["width"]: x["parameters"] for x in rows if "parameters" in x}
    assert params[1 / 16] < params[1 / 8] < r["teacher"]["parameters"]


def test_the_files_hold_the_table_the_results_and_a_figure(results):
    out, r = results
    md = (out / "ablation.md").read_text()
    assert all(label in md for label, _ in ROWS) and "teacher" in md and "±" in md
    assert json.loads((out / "ablation.json").read_text())["rows"][1]["row"] == "+PI"
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ho_row_scales_its_critic_to_the_students(results):
    """The HO row's Discriminator is CRITIC_WIDTH wide (not the public code's 64), and the table says so."""
    pytest.importorskip("pyamalgam.losses.holistic")
    import torch

    from pyamalgam.distill.setup import make_holistic
    from pyamalgam.distill.terms import parse_terms

    (spec,) = [s for s in parse_terms(dict(ROWS)["+PI+PA+HO"]) if s.holistic]
    ho = make_holistic(spec, torch.zeros(1, 5, 16, 16), torch.device("cpu"))
    assert ho.critic.width == ablation.CRITIC_WIDTH == 16
    assert "HO's critic A2L4 at width 16" in (results[0] / "ablation.md").read_text()


def test_bad_settings():
    with pytest.raises(ValueError, match="preset must be one of"):
        ablation_config("huge")
    with pytest.raises(ValueError, match="multiples of 2\\^depth"):
        ablation_config("micro", resolution=(18, 16))
    with pytest.raises(ValueError, match="seeds must be"):
        run_ablation("unused", seeds=(), config=ablation_config("micro"))


def _parser():
    parser = argparse.ArgumentParser(prog="pyamalgam")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_command_parses_checks_and_runs(tmp_path, monkeypatch, capsys):
    args = _parser().parse_args(["distill", "--quick", "--out", str(tmp_path / "d"), "--seeds", "3", "--no-progress"])
    assert args.seeds == (3,) and args.fn is run and args.check is check
    check(args)
    monkeypatch.setitem(ablation._PRESETS, "quick", ablation_config("micro"))  # the smoke test's size
    assert args.fn(args) == 0
    assert "+PI+PA" in capsys.readouterr().out and (tmp_path / "d" / "ablation.json").is_file()


@pytest.mark.parametrize("argv", [["--seeds", "0,0"], ["--seeds", "a"], ["--device", "tpu"], ["--threads", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["distill", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_out_must_be_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check(_parser().parse_args(["distill", "--out", str(tmp_path / "file")]))

"""The video trainer (thesis 003 ch. 5, Eq. 5.3) and ``pyamalgam distill --video`` (Table 5.1): the
micro preset end to end, every row's terms active and weighted by lambda, the random-sample
policy, bit-identical resume after an interruption and after ``kill -9``, and bad arguments."""
import argparse
import json
from pathlib import Path

import pytest
import torch
from _distill_cases import (
    VIDEO_ALL,
    Clips,
    T,
    clip_loader,
    digest_all,
    nets,
    video_distiller,
)

from pyamalgam._testing import FailingAt, Interrupt, checkpoint_step, kill_9_then_resume
from pyamalgam.distill import video_ablation
from pyamalgam.distill.command import add_parser, check
from pyamalgam.distill.video import LAMBDA, RandomSampledTriplets, VideoDistiller
from pyamalgam.distill.video_ablation import (
    VIDEO_ROWS,
    run_video_ablation,
    video_config,
)

HERE = Path(__file__).parent


# ------------------------------------------------------------------ the table, end to end

@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("video")
    return out, run_video_ablation(out, seeds=(0, 1), progress=False, config=video_config("micro"))


def test_the_micro_table_runs_every_row_over_two_seeds_with_its_terms_active(table):
    _, r = table
    assert [x["row"] for x in r["rows"]] == [label for label, _ in VIDEO_ROWS]
    assert 0 <= r["teacher"]["miou"] <= 1 and 0 <= r["teacher"]["tc"] <= 1
    for row, (_, terms) in zip(r["rows"], VIDEO_ROWS):
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for key in ("miou", "tc"):
            assert 0 <= row[key] <= 1 and row[f"{key}_std"] >= 0
            assert row[key] == pytest.approx(sum(run[key] for run in row["runs"]) / 2)
        for run in row["runs"]:  # the logged terms are exactly the row's (and the labels' loss)
            assert set(run["losses"]) == {*terms, "mc", "labelled", "total"}
            assert run["losses"]["mc"] > 0 and run["losses"]["labelled"] == 1.0
            assert all(run["losses"][t] != 0 for t in terms)


def test_the_files_hold_the_table_the_results_and_the_clip_figure(table):
    out, _ = table
    md = (out / "video.md").read_text()
    assert all(label in md for label, _ in VIDEO_ROWS) and "| teacher |" in md and "±" in md and "TC (%)" in md
    assert md.count("✓") == 1 + 1 + 1 + 1 + 4  # the SF, PF, MF, TL columns of Table 5.1's rows b-e and j
    saved = json.loads((out / "video.json").read_text())
    assert saved["rows"][-1]["terms"] == list(VIDEO_ALL) and saved["config"]["lam"] == LAMBDA
    assert (out / "video.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the objective

def test_eq_5_3_is_the_cross_entropy_plus_lambda_times_every_term():
    d = video_distiller()
    batch = next(iter(clip_loader()))
    values = d.losses(batch)
    assert set(values) == {*VIDEO_ALL, "mc", "labelled", "total"}
    assert d.weights == dict.fromkeys(VIDEO_ALL, LAMBDA)
    expected = values["mc"] + LAMBDA * sum(values[t] for t in VIDEO_ALL)
    assert values["total"] == pytest.approx(expected, rel=1e-5)
    assert values["tl"] > 0 and values["pf"] > 0 and values["pi"] > 0


def test_the_baseline_skips_the_teacher_and_a_term_of_ones_own_weight_is_kept():
    d = video_distiller(terms={})
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    values = d.losses(next(iter(clip_loader())))
    assert set(values) == {"mc", "labelled", "total"} and values["total"] == values["mc"] and not calls
    d = video_distiller(terms={"tl": 2.0, "pf": {"weight": 0.5, "patch": 2}})
    assert d.weights == {"tl": 2.0, "pf": 0.5}


def test_tl_reads_the_exact_visibility_or_the_image_based_weight():
    batch = next(iter(clip_loader()))
    exact = video_distiller(terms={"tl": {"occlusion": "exact"}}).losses(batch)["tl"]
    auto = video_distiller(terms={"tl": None}).losses(batch)["tl"]
    image = video_distiller(terms={"tl": {"occlusion": "image"}}).losses(batch)["tl"]
    assert exact == auto != image
    with pytest.raises(KeyError, match="flow_valid"):
        video_distiller(terms={"tl": {"occlusion": "exact"}}).losses({k: v for k, v in batch.items()
                                                                     if k != "flow_valid"})


def test_a_flow_estimator_stands_in_for_a_missing_flow():
    batch = next(iter(clip_loader()))
    seen = []

    def estimator(a, b):
        seen.append(a.shape)
        return torch.zeros(a.shape[0], 2, *a.shape[2:])

    values = video_distiller(terms=("tl",), flow=estimator).losses({"image": batch["image"], "seg": batch["seg"]})
    assert len(seen) >= T - 1 and values["tl"] >= 0


def test_the_random_sample_policy_draws_every_triplet_around_the_labelled_frame():
    length = 5
    clip = {"image": torch.arange(length, dtype=torch.float32).view(length, 1, 1, 1).expand(length, 3, 4, 4),
            "seg": torch.arange(length).view(length, 1, 1).expand(length, 4, 4).clone(),
            "flow": torch.zeros(length - 1, 2, 4, 4), "flow_valid": torch.ones(length - 1, 4, 4, dtype=torch.bool)}
    asked = []

    def pair_flow(i, s, t):
        asked.append((i, s, t))
        return torch.full((2, 4, 4), float(10 * s + t)), torch.ones(4, 4, dtype=torch.bool)

    rs = RandomSampledTriplets([clip, clip], anchor=2, pair_flow=pair_flow)
    assert len(rs) == 2 * 2 * 2  # frame_f in {0, 1}, frame_b in {3, 4}, per clip
    frames = {tuple(int(v) for v in rs[i]["image"][:, 0, 0, 0]) for i in range(len(rs))}
    assert frames == {(0, 2, 3), (0, 2, 4), (1, 2, 3), (1, 2, 4)}
    item = rs[rs.items.index((0, 0, 4))]
    assert (item["seg"][[0, 2]] == 255).all() and (item["seg"][1] == 2).all()  # T' = 1: the anchor's labels
    assert item["flow"][0].unique().tolist() == [2.0] and item["flow"][1].unique().tolist() == [24.0]
    adjacent = RandomSampledTriplets([clip], anchor=2, policy="adjacent")
    assert len(adjacent) == 1 and adjacent[0]["image"][:, 0, 0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="pass pair_flow"):
        RandomSampledTriplets([clip], anchor=2)
    with pytest.raises(ValueError, match="anchor must leave a frame"):
        RandomSampledTriplets([clip], anchor=4, pair_flow=pair_flow)


# ------------------------------------------------------------------ checkpoints and resume

def run(checkpoint_dir=None, data=None):
    d = video_distiller(checkpoint_dir, checkpoint_every=1)
    d.fit(clip_loader(data=data), 2)
    return d


@pytest.fixture(scope="module")
def reference():
    d = run()
    return {**digest_all(d), "losses": d.history[-1]["losses"]}


def test_an_interrupted_video_run_resumes_bit_identical(tmp_path, reference):
    with pytest.raises(Interrupt):
        run(tmp_path, FailingAt(Clips(8), 11))  # in the second epoch (4 steps an epoch)
    assert checkpoint_step(tmp_path / "last.safetensors") >= 4
    d = run(tmp_path)
    assert {**digest_all(d), "losses": d.history[-1]["losses"]} == reference
    assert "terms/mf.convlstm.gates.weight" in __import__("pyamalgam.engine", fromlist=["x"]).load_checkpoint(
        tmp_path / "last.safetensors")[0]


def test_a_checkpoint_of_other_video_terms_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="different setup"):
        video_distiller(tmp_path, terms={**dict.fromkeys(VIDEO_ALL), "tl": 0.2}).fit(clip_loader(), 2)


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from _distill_cases import clip_loader, digest_all, video_distiller
d = video_distiller(sys.argv[1], checkpoint_every=1)
d.fit(clip_loader(delay=float(sys.argv[3])), 2)
with open(sys.argv[1] + "/result.json", "w") as f:
    json.dump({**digest_all(d), "losses": d.history[-1]["losses"]}, f)
"""


@pytest.mark.slow
def test_kill_9_mid_video_run_then_resume_is_bit_identical(tmp_path, reference, pyamalgam_env):
    # killed inside epoch 2 (4 steps an epoch); a long timeout for a loaded CI machine
    _, result = kill_9_then_resume(CHILD, tmp_path, HERE, at=5, total=8, delay=0.05, env=pyamalgam_env, timeout=300)
    assert result == reference


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("terms, error, match", [
    ({"ho": 0.1}, ValueError, "not a term of Eq. 5.3"),
    ({"tl": {"radius": 1}}, ValueError, "unknown option"),
    ({"pf": -1.0}, ValueError, "finite number >= 0"),
    ({"tl": {"occlusion": "mask"}}, ValueError, "occlusion"),
    ({"mf": {"patch": 0}}, ValueError, "terms\\['mf'\\]"),
    ({"nope": 1.0}, ValueError, "unknown term"),
    ("tl", TypeError, "terms must be"),
])
def test_bad_terms_are_refused_by_name(terms, error, match):
    with pytest.raises(error, match=match):
        video_distiller(terms=terms)


def test_bad_networks_batches_and_settings():
    teacher, _ = nets()
    _, depth_student = nets("depth")
    with pytest.raises(TypeError, match="segmentation network"):
        VideoDistiller(teacher, depth_student, terms=("tl",))
    with pytest.raises(ValueError, match="lam must be"):
        video_distiller(lam=float("nan"))
    d = video_distiller(terms=("tl",))
    batch = next(iter(clip_loader()))
    with pytest.raises(ValueError, match="clips \\(B, T, C, H, W\\)"):
        d.losses({"image": batch["image"][:, 0]})
    with pytest.raises(KeyError, match="batch\\['flow'\\]"):
        d.losses({"image": batch["image"]})
    with pytest.raises(ValueError, match="batch\\['flow'\\] must be"):
        d.losses({**batch, "flow": batch["flow"][:, :1]})
    with pytest.raises(ValueError, match="anchor must leave"):
        video_config("micro", anchor=0)


def _parser():
    parser = argparse.ArgumentParser(prog="pyamalgam")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_command_takes_video_and_its_default_folder_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["distill", "--video", "--quick", "--seeds", "0,1", "--no-progress"])
    assert args.video and args.quick and args.seeds == (0, 1)
    check(args)
    assert args.out == "runs/distill-video" and (tmp_path / "runs" / "distill-video").is_dir()
    monkeypatch.setitem(video_ablation._PRESETS, "quick", video_config("micro", student_steps=1))
    assert args.fn(args) == 0
    assert "j: all" in capsys.readouterr().out and (tmp_path / "runs" / "distill-video" / "video.png").is_file()


@pytest.mark.parametrize("argv", [["--seeds", "0,0"], ["--seeds", "x"], ["--threads", "0"], ["--device", "tpu"],
                                  ["--frames", "3"]])
def test_bad_video_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["distill", "--video", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err

"""The experiment end to end: stages in order, evaluation, report (see the package docstring)."""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch

from .._checks import as_int
from .._io import atomic_write
from ..amalgamation.branch import decoder_candidates
from ..engine import FolderLock
from ..models import count_parameters
from ..teachers import check_output_folder
from .config import TASKS, DemoConfig, _default_device, demo_config
from .evaluation import evaluate, predict_samples
from .stages import _Amalgamation, _log, _stage_data, _stage_teacher

__all__ = ["run_demo"]


NAMES = {"seg": "SegNet", "depth": "DepthNet", "normal": "NormNet"}


class _Clock:
    """Per-stage wall times (and whether the stage came from the cache) for results.json."""

    def __init__(self, progress: bool):
        self.progress, self.timings, self.t = progress, {}, time.perf_counter()

    def mark(self, name: str, cached: bool = False) -> None:
        now = time.perf_counter()
        self.timings[name] = {"seconds": round(now - self.t, 3), "cached": bool(cached)}
        _log(f"[demo] {name}: {now - self.t:.1f}s{' (cached)' if cached else ''}", self.progress)
        self.t = now


def _stage_teachers(tasks, cfg, train, data_key, out, device, seed, clock):
    teachers, records, keys = {}, {}, {}
    for task in tasks:
        teachers[task], records[task], keys[task], cached = _stage_teacher(task, cfg, train, data_key, out, device,
                                                                           seed, clock.progress)
        clock.mark(f"teacher {task}", cached)
    return teachers, records, keys


def _stage_targetnet2(teachers, keys, cfg, unlabelled, out, device, seed, clock):
    """One block-wise fit (Eq. 6), then the Eq. 7 TargetNet and Decoder_b1..b5 (Table 1)."""
    tn2 = _Amalgamation("tn2", {t: teachers[t] for t in ("seg", "depth")}, {"seg": ["seg"], "depth": ["depth"]},
                        cfg, unlabelled, [keys["seg"], keys["depth"], keys["unlabelled"]], out, device, seed, clock.progress,
                        weights=cfg.lambdas(("seg", "depth")))
    tn2.fit()
    clock.mark("TargetNet-2 block-wise fit (Eq. 6)", tn2.cached)
    target2, points2 = tn2.target("eq7")
    variants = {}
    for b, block in enumerate(decoder_candidates(tn2.am.num_blocks), start=1):
        forced = {"seg": block, "depth": block}
        if not cfg.finetune_variants:  # Steps 2-3 only: every variant from the same fit, none fine-tuned
            variants[b] = (tn2.assembled(f"decoder_b{b}", forced), forced, "step2")
        elif forced == points2:  # the Eq. 7 TargetNet is this variant: same net, same budget
            variants[b] = (target2, forced, "eq7")
            tn2.results[f"decoder_b{b}"] = dict(tn2.results["eq7"], same_as="eq7")
        else:
            variants[b] = (tn2.target(f"decoder_b{b}", forced)[0], forced, f"decoder_b{b}")
    clock.mark("TargetNet-2 branch-out + fine-tune (Eq. 7, Decoder_b1..b5)",
               all(r.get("cached") for r in tn2.results.values()))
    return tn2, target2, variants


def _stage_structured(teachers, keys, cfg, unlabelled, out, device, seed, clock) -> dict:
    """Table 1's structured rows (``cfg.structured_rows``, issue 12): TargetNet-2 again, its
    block-wise fit and fine-tune with the Amalgamator's terms (their default weights), Eq. 7."""
    rows = {}
    for row in filter(None, cfg.structured_rows.split(",")):
        am = _Amalgamation(f"tn2_{row.replace('+', '_')}", {t: teachers[t] for t in ("seg", "depth")},
                           {"seg": ["seg"], "depth": ["depth"]}, cfg, unlabelled,
                           [keys["seg"], keys["depth"], keys["unlabelled"]], out, device, seed, clock.progress,
                           terms={t: {} for t in row.split("+")}, weights=cfg.lambdas(("seg", "depth")))
        am.fit()
        rows[row] = (am, am.target("eq7")[0])
        clock.mark(f"TargetNet-2 + {row.upper()} (Eq. 6/7 with structured terms)",
                   am.cached and am.results["eq7"]["cached"])
    return rows


def _save_models(out, stages) -> dict:
    """Each final TargetNet as a model file in ``models/`` (docs/demo.md, Outputs): name -> path
    relative to the run folder."""
    return {name: am.save_model(net, "eq7", out / "models" / f"{name}.safetensors") for name, (am, net) in stages.items()}


def _stage_targetnet3(teachers, keys, tn2, target2, cfg, unlabelled, out, device, seed, clock) -> dict:
    """TargetNet-3 offline (Eq. 8: the three teachers) and online (Eq. 9: TargetNet-2 + NormNet)."""
    tasks = tuple(teachers)
    off = _Amalgamation("tn3_offline", dict(teachers), {t: [t] for t in tasks}, cfg, unlabelled,
                        [*(keys[t] for t in tasks), keys["unlabelled"]], out, device, seed, clock.progress,
                        weights=cfg.lambdas(tasks))
    off.fit()
    net_off = off.target("eq7")[0]
    clock.mark("TargetNet-3 offline (Eq. 8)", off.cached and off.results["eq7"]["cached"])
    # a copy: the online amalgamation freezes its teachers, and target2 is still evaluated; TargetNet-2
    # keeps its own Eq. 6 lambdas (Eq. 9's L_u2), so only the normal task's lambda is given here
    upstream = [tn2.key, tn2.results["eq7"]["points"], cfg.finetune_steps, keys["normal"]]
    on = _Amalgamation("tn3_online", {"tn2": copy.deepcopy(target2), "normal": teachers["normal"]},
                       {"tn2": ["seg", "depth"], "normal": ["normal"]}, cfg, unlabelled, upstream, out, device, seed,
                       clock.progress, weights=cfg.lambdas(("normal",)))
    on.fit()
    net_on = on.target("eq7")[0]
    clock.mark("TargetNet-3 online (Eq. 9)", on.cached and on.results["eq7"]["cached"])
    return {"tn3_offline": (off, net_off), "tn3_online": (on, net_on)}


def _evaluate_all(teachers, records, tn2, target2, variants, tn3, test, cfg, device, structured=None) -> dict:
    """Test metrics of every network: the entries of Table 1 and Table 2."""
    def ev(net, tasks):
        return evaluate(net, test, tasks, device=device, batch_size=cfg.eval_batch)

    out = {"teachers": {}, "targets": {}}
    for task, net in teachers.items():
        record = records[task]
        out["teachers"][task] = {"name": NAMES[task], "params": count_parameters(net), "metrics": ev(net, (task,))[task],
                                 "train_loss_first": record.loss_first, "train_loss_final": record.loss_final,
                                 "train_seconds": record.seconds}
    eq7 = {"label": "TargetNet (Eq. 7)", "points": tn2.results["eq7"]["points"], "params": count_parameters(target2),
           "metrics": ev(target2, ("seg", "depth"))}
    out["targets"]["tn2_eq7"] = eq7
    for b, (net, forced, source) in variants.items():
        metrics = eq7["metrics"] if source == "eq7" else ev(net, ("seg", "depth"))
        label = f"Decoder_b{b}" + (" (Steps 2-3)" if source == "step2" else "")
        out["targets"][f"tn2_decoder_b{b}"] = {"label": label, "points": forced, "source": source,
                                               "finetuned": source != "step2", "params": count_parameters(net),
                                               "metrics": metrics}
    for row, (am, net) in (structured or {}).items():
        out["targets"][f"tn2_eq7_{row}"] = {"label": f"TargetNet, Eq. 7 + {row.upper()}", "structured": row.split("+"),
                                            "points": am.results["eq7"]["points"], "params": count_parameters(net),
                                            "metrics": ev(net, ("seg", "depth"))}
    for name, (am, net) in tn3.items():
        out["targets"][name] = {"label": name, "points": am.results["eq7"]["points"], "params": count_parameters(net),
                                "metrics": ev(net, tuple(teachers))}
    stages = [tn2, *(am for am, _ in (structured or {}).values()), *(am for am, _ in tn3.values())]
    out["amalgamations"] = {am.name: am.summary() for am in stages}
    return out


def run_demo(out="runs/demo", *, device=None, quick: bool = False, seed: int = 0, progress: bool = True,
             config: DemoConfig | None = None, threads: int | None = None, data: str | None = None,
             echo: bool = True) -> dict:
    """Run (or resume) the whole experiment in ``out``; returns the results written there.

    Args:
        out: the run directory (caches, tables, figures).
        device: "cpu", "cuda", "cuda:1"... (default: cuda if available).
        quick: the CI-sized preset (tiny images and network; every stage still runs).
        seed: seeds the data, the teachers and the amalgamation.
        progress: tqdm bars and stage lines on stderr.
        config: a :class:`DemoConfig` instead of the preset.
        threads: torch CPU threads (default: torch's choice).
        data: "synthetic" (default) or a real data set spec (``nyuv2:/path``); see docs/demo.md.
        echo: print the tables to stdout.

    One demo at a time per ``out``: a second process on the same folder is refused
    (:class:`~pyamalgam.engine.FolderInUseError`, exit code 2) while the first holds its lock.
    """
    t_start = time.perf_counter()
    device = _default_device(device)
    checked = as_int(seed)
    if checked is None or checked < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = checked  # a plain int: it is written to config.json
    cfg = config if config is not None else demo_config(quick, device)
    cfg = (dataclasses.replace(cfg, data=data) if data is not None else cfg).validate()
    if threads is not None:
        torch.set_num_threads(threads)
    out = check_output_folder(out)  # an unwritable run folder fails here, naming it, not after the first stage
    # held until the run ends, however it ends, with the stages' locks inside (docs/robustness.md)
    with FolderLock(out, "out (--out)", subfolders=True):
        return _run_locked(out, cfg, device=device, seed=seed, quick=quick, progress=progress, echo=echo,
                           t_start=t_start)


def _run_locked(out, cfg, *, device, seed, quick, progress, echo, t_start) -> dict:
    """The stages of :func:`run_demo` in ``out``, whose lock this process holds."""
    from .. import report

    atomic_write(out / "config.json", json.dumps({"config": cfg.to_json(), "device": str(device), "seed": seed,
                                                  "quick": quick}, indent=1) + "\n")
    _log(f"[demo] run dir {out} | device {device} | {cfg.resolution[0]}x{cfg.resolution[1]} images, width "
         f"{cfg.width:g}, {'quick' if quick else 'full'} preset", progress)
    clock = _Clock(progress)

    data_cached = all((out / "data" / f"{s}.safetensors").is_file() for s in ("train", "unlabelled", "test"))
    splits, data_keys = _stage_data(cfg, out, seed, progress)
    clock.mark("data", cached=data_cached)
    tasks = tuple(t for t in TASKS if t in splits["test"].tasks)
    if tasks[:2] != ("seg", "depth"):
        raise ValueError(f"the demo needs segmentation and depth ground truth; {cfg.data} has {tasks}")
    teachers, records, keys = _stage_teachers(tasks, cfg, splits["train"], data_keys["train"], out, device, seed, clock)
    keys["unlabelled"] = data_keys["unlabelled"]  # what the students learn from
    tn2, target2, variants = _stage_targetnet2(teachers, keys, cfg, splits["unlabelled"], out, device, seed, clock)
    structured = _stage_structured(teachers, keys, cfg, splits["unlabelled"], out, device, seed, clock)
    tn3 = {}
    if "normal" in tasks:
        tn3 = _stage_targetnet3(teachers, keys, tn2, target2, cfg, splits["unlabelled"], out, device, seed, clock)
    models = _save_models(out, {"tn2": (tn2, target2), **{am.name: (am, net) for am, net in structured.values()}, **tn3})
    clock.mark("model files (models/)")

    results = {"config": cfg.to_json(), "device": str(device), "seed": seed, "quick": quick,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "data": {split: len(ds) for split, ds in splits.items()}, "num_blocks": tn2.am.num_blocks,
               **_evaluate_all(teachers, records, tn2, target2, variants, tn3, splits["test"], cfg, device, structured),
               "models": models}
    clock.mark("evaluation")
    pairs = {t: ((NAMES[t], teachers[t]), ("TargetNet-2", target2)) for t in ("seg", "depth")}
    if tn3:
        pairs["normal"] = ((NAMES["normal"], teachers["normal"]), ("TargetNet-3", tn3["tn3_offline"][1]))
    samples = predict_samples(pairs, splits["test"], cfg.figure_samples, device)
    clock.mark("predictions for figures")
    results["timings"] = clock.timings
    results["total_seconds"] = round(time.perf_counter() - t_start, 3)
    written = report.write_report(out, results, samples, echo=echo)
    results["files"] = {k: str(v) for k, v in written.items()}
    _log(f"[demo] done in {time.perf_counter() - t_start:.1f}s; tables and figures in {out}", progress)
    return results

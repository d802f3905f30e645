"""Tables and figures of the demo (paper 001, §6): Table 1, Table 2, Figs. 5-6, the Eq. 7 losses.

:func:`write_report` takes the results dict that :func:`pyamalgam.demo.run_demo` builds and writes
into the run directory:

* ``table1.md`` / ``table1.json``: TeacherNet, Decoder_b1..b5 and the Eq. 7 TargetNet on
  segmentation and depth (Params, mIoU, Pixel Acc, abs rel, sq rel, δ1-3), as in Table 1;
* ``table2.md`` / ``table2.json``: TeacherNet, TargetNet-2 and TargetNet-3 (offline, Eq. 8 and
  online, Eq. 9) with the surface-normal metrics, as in Table 2;
* ``results.json``: everything measured (all metrics, losses, timings, configuration);
* ``fig5_seg_depth.png`` and ``fig6_normals.png``: image, ground truth, teacher and student per
  task on test images, as in Figs. 5-6;
* ``block_losses.png``: the final block-wise loss L^n of every output per block (what Eq. 7
  minimises), with the chosen branch points marked.

Numbers are printed as measured (ratios as fractions, angles in degrees, like the paper's
tables). Every student row also carries, per metric, its relative gain over the TeacherNet row and
their mean Δm (:func:`deltas`): numbers a reader can check, no verdict words. The formatting
functions take plain dicts so they can be tested without running the demo.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

from ._io import atomic_write

__all__ = [
    "deltas",
    "markdown_table",
    "plot_block_losses",
    "plot_qualitative",
    "relative_gain",
    "table1",
    "table2",
    "write_report",
]

# (column header, task, metric key, decimals)
TABLE1_COLUMNS = (
    ("mIoU", "seg", "miou", 3), ("Pixel Acc", "seg", "pixel_acc", 3),
    ("abs rel", "depth", "abs_rel", 3), ("sq rel", "depth", "sq_rel", 3),
    ("δ<1.25", "depth", "delta1", 3), ("δ<1.25²", "depth", "delta2", 3), ("δ<1.25³", "depth", "delta3", 3),
)
TABLE2_COLUMNS = (
    ("mIoU", "seg", "miou", 3), ("abs rel", "depth", "abs_rel", 3), ("sq rel", "depth", "sq_rel", 3),
    ("mean angle", "normal", "mean", 2), ("median angle", "normal", "median", 2),
    ("within 11.25°", "normal", "within_11_25", 3), ("within 22.5°", "normal", "within_22_5", 3),
    ("within 30°", "normal", "within_30", 3),
)
#: Metrics where lower is better (errors and angles); every other column is higher-is-better.
LOWER_IS_BETTER = frozenset({"abs_rel", "sq_rel", "mean", "median"})
_TEACHER_NAMES = {"seg": "SegNet", "depth": "DepthNet", "normal": "NormNet"}
_AMALGAMATION_TITLES = {"tn2": "TargetNet-2 (Eq. 6)", "tn3_offline": "TargetNet-3 offline (Eq. 8)",
                        "tn3_online": "TargetNet-3 online (Eq. 9)"}


# ------------------------------------------------------------------------------- tables

def _decoder_block(n: int, num_blocks: int) -> int:
    """Absolute block n -> decoder block b (Decoder_bb branches out at n = N/2 + b)."""
    return n - num_blocks // 2


def _points_text(points: Mapping[str, int], num_blocks: int) -> str:
    return ", ".join(f"{k} b{_decoder_block(n, num_blocks)}" for k, n in points.items())


def _teacher_row(results: Mapping, tasks) -> dict:
    """The paper's one TeacherNet row: each task's metrics from its own teacher, Params summed."""
    teachers = results["teachers"]
    names = " + ".join(teachers[t].get("name", _TEACHER_NAMES[t]) for t in tasks if t in teachers)
    return {"label": f"TeacherNet ({names})", "params": sum(teachers[t]["params"] for t in tasks if t in teachers),
            "metrics": {t: dict(teachers[t]["metrics"]) for t in tasks if t in teachers}}


def _target_row(entry: Mapping, label: str) -> dict:
    return {"label": label, "params": entry["params"], "points": dict(entry.get("points", {})),
            "metrics": dict(entry["metrics"])}


def relative_gain(value: float, reference: float, key: str) -> float | None:
    """``(-1)^l (value - reference) / reference`` with l = 1 for a lower-is-better metric: the
    relative gain over the teacher (positive: closer to perfect); None where it is undefined."""
    if value is None or reference is None or not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return None
    gain = (reference - value) if key in LOWER_IS_BETTER else (value - reference)
    return gain / abs(reference)


def deltas(row: Mapping, teacher: Mapping, columns) -> tuple:
    """Per column the relative gain of ``row`` over the ``teacher`` row, and Δm: their
    mean over the columns where both have a value (Maninis et al., CVPR 2019; docs/demo.md)."""
    per = {}
    for header, task, key, _ in columns:
        per[header] = relative_gain(row["metrics"].get(task, {}).get(key),
                                    teacher["metrics"].get(task, {}).get(key), key)
    known = [v for v in per.values() if v is not None]
    return per, (sum(known) / len(known) if known else None)


def table1(results: Mapping) -> list:
    """Rows of Table 1: TeacherNet (SegNet + DepthNet), Decoder_b1..bK, the Eq. 7 TargetNet, and
    the Eq. 7 TargetNets trained with structured terms ("TargetNet, Eq. 7 + PI", if any)."""
    n = results["num_blocks"]
    rows = [_teacher_row(results, ("seg", "depth"))]
    targets = results["targets"]
    for key in sorted((k for k in targets if k.startswith("tn2_decoder_b")), key=lambda k: int(k.rsplit("b", 1)[1])):
        rows.append(_target_row(targets[key], targets[key].get("label", key[4:].capitalize())))
    eq7 = targets["tn2_eq7"]
    rows.append(_target_row(eq7, f"TargetNet, Eq. 7 ({_points_text(eq7['points'], n)})"))
    for key, entry in targets.items():  # the Amalgamator's structured terms (issue 12), in the config's order
        if key.startswith("tn2_eq7_"):
            rows.append(_target_row(entry, f"{entry['label']} ({_points_text(entry['points'], n)})"))
    return rows


def table2(results: Mapping) -> list:
    """Rows of Table 2: TeacherNet (three teachers), TargetNet-2, TargetNet-3 offline and online."""
    targets = results["targets"]
    rows = [_teacher_row(results, ("seg", "depth", "normal")), _target_row(targets["tn2_eq7"], "TargetNet-2")]
    for key, label in (("tn3_offline", "TargetNet-3 offline (Eq. 8)"), ("tn3_online", "TargetNet-3 online (Eq. 9)")):
        if key in targets:
            rows.append(_target_row(targets[key], label))
    return rows


def _cell(row: Mapping, task: str, key: str, decimals: int) -> str:
    value = row["metrics"].get(task, {}).get(key)
    if value is None:
        return "–"  # the network has no such output (e.g. TargetNet-2 has no normals)
    return f"{value:.{decimals}f}" if math.isfinite(value) else str(value)


def _params(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def markdown_table(rows, columns) -> str:
    """A GitHub markdown table: Method, Params (and % of the first row's), ``columns``
    ((header, task, key, decimals)), Δm. The first row is the reference (the teachers); every
    other cell shows its relative gain over it in parentheses (:func:`relative_gain`)."""
    header = ["Method", "Params", *(c[0] for c in columns), "Δm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference = rows[0]
    for i, row in enumerate(rows):
        params = _params(row["params"])
        cells = [_cell(row, *c[1:]) for c in columns]
        if i == 0:
            delta_m = "ref."
        else:
            per, dm = deltas(row, reference, columns)
            params += f" ({100 * row['params'] / reference['params']:.0f}%)"
            cells = [c if per[col[0]] is None else f"{c} ({_percent(per[col[0]])})" for c, col in zip(cells, columns)]
            delta_m = _percent(dm)
        lines.append("| " + " | ".join([row["label"], params, *cells, delta_m]) + " |")
    return "\n".join(lines)


def _table_json(rows, columns) -> list:
    """Rows with exactly the table's numbers (raw floats; None where the network has no output)."""
    out = []
    for i, row in enumerate(rows):
        values = {c[0]: row["metrics"].get(c[1], {}).get(c[2]) for c in columns}
        entry = {"label": row["label"], "params": row["params"], "points": row.get("points"), "values": values}
        if i:  # relative gain over the teachers (row 0), + = closer to perfect, and its mean
            entry["delta"], entry["delta_m"] = deltas(row, rows[0], columns)
            entry["params_fraction"] = row["params"] / rows[0]["params"]
        out.append(entry)
    return out


def _caption(results: Mapping) -> str:
    cfg = results.get("config", {})
    res = cfg.get("resolution", ["?", "?"])
    sizes = results.get("data", {})
    return (f"Measured on {results.get('device', '?')} ({results.get('threads', '?')} threads), data "
            f"{cfg.get('data', '?')} {res[0]}x{res[1]} (train {sizes.get('train', '?')}, unlabelled "
            f"{sizes.get('unlabelled', '?')}, test {sizes.get('test', '?')} images), width {cfg.get('width', '?')}, "
            f"seed {results.get('seed', '?')}, {'quick' if results.get('quick') else 'full'} preset"
            f"{_lambdas(cfg)}. Ratios are fractions, angles in degrees. In parentheses: Params as a share of the teachers', and "
            f"each metric's relative gain over the TeacherNet row, signed so that + means a higher value, or a "
            f"lower one for abs rel, sq rel and angles; Δm is the mean of a row's gains (docs/demo.md).")


def _lambdas(cfg: Mapping) -> str:
    """", task lambdas depth 3 (others 1)" when the run weighs its tasks (``task_weights``)."""
    weights = cfg.get("task_weights") or ""
    return f", task lambdas {weights.replace('=', ' ').replace(',', ', ')} (others 1)" if weights else ""


def _variants_note(results: Mapping) -> str:
    steps = results.get("config", {}).get("finetune_steps", "?")
    variants = [t for k, t in results["targets"].items() if k.startswith("tn2_decoder_b")]
    if variants and not any(t.get("finetuned", True) for t in variants):
        return (f"Decoder_bn: every task branches out at decoder block n, assembled from the one block-wise fit "
                f"(Steps 2-3) and not fine-tuned; the Eq. 7 TargetNet is that fit branched where Eq. 7 says, then "
                f"fine-tuned for {steps} steps (Step 4).")
    return (f"Decoder_bn: every task branches out at decoder block n; each TargetNet got the same fine-tune budget "
            f"({steps} steps).")


def format_tables(results: Mapping) -> dict:
    """Markdown of both tables (with their captions) and their JSON rows."""
    caption = _caption(results)
    t1, t2 = table1(results), table2(results)
    md1 = ("## Table 1: TeacherNet and TargetNet-2 branched out at each decoder block\n\n"
           f"{markdown_table(t1, TABLE1_COLUMNS)}\n\n"
           f"{_variants_note(results)} {caption}\n")
    md2 = ("## Table 2: TeacherNet, TargetNet-2 and TargetNet-3\n\n"
           f"{markdown_table(t2, TABLE2_COLUMNS)}\n\n{caption}\n")
    return {"table1.md": md1, "table2.md": md2,
            "table1.json": {"columns": [c[0] for c in TABLE1_COLUMNS], "rows": _table_json(t1, TABLE1_COLUMNS)},
            "table2.json": {"columns": [c[0] for c in TABLE2_COLUMNS], "rows": _table_json(t2, TABLE2_COLUMNS)}}


# ------------------------------------------------------------------------------ figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _seg_rgb(labels, num_classes: int, ignore_index: int | None = None):
    import numpy as np

    plt = _pyplot()
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    lab = np.asarray(labels).astype(np.int64)
    rgb = cmap(np.clip(lab, 0, num_classes - 1))[..., :3]
    if ignore_index is not None:
        rgb[lab == ignore_index] = 0.0
    return rgb


def _normal_rgb(normals, mask=None):
    """Unit normals (3, H, W) -> RGB (n + 1) / 2; invalid pixels grey."""
    import numpy as np

    n = np.asarray(normals, dtype=np.float64)
    n = n / np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-8)
    rgb = np.clip((n.transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)
    if mask is not None:
        rgb[~np.asarray(mask, dtype=bool)] = 0.5
    return rgb


def _panel(task: str, value, samples: Mapping, i: int, gt: bool):
    """(image array, imshow kwargs) of one panel of the qualitative grid."""
    import numpy as np

    inputs = samples["inputs"]
    mask = np.asarray(inputs["mask"][i], dtype=bool)
    if task == "seg":
        ignore = samples.get("ignore_index") if gt else None
        return _seg_rgb(value, len(samples["class_names"]), ignore), {}
    if task == "depth":
        d = np.asarray(value, dtype=np.float64).squeeze()
        valid = mask & (np.asarray(inputs["depth"][i]) > 0)
        d = np.ma.masked_where(~valid, d) if gt else d
        lo, hi = samples.get("depth_range", (0.0, float(np.nanmax(np.asarray(inputs["depth"])))))
        return d, {"cmap": "magma_r", "vmin": lo, "vmax": hi}
    return _normal_rgb(value, mask if gt else None), {}


def plot_qualitative(samples: Mapping, tasks, path) -> Path:
    """Figs. 5-6: per test image, the input, then for each task ground truth | teacher | student.

    ``samples``: ``inputs`` (batched tensors or arrays: image, seg, depth, normal, mask),
    ``predictions`` task -> {"teacher": (name, batch), "student": (name, batch)}, ``class_names``.
    """
    import numpy as np

    plt = _pyplot()
    tasks = [t for t in tasks if t in samples["predictions"]]
    images = np.asarray(samples["inputs"]["image"])
    n = images.shape[0]
    cols = 1 + 3 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.7 * n + 0.4), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(np.clip(images[i].transpose(1, 2, 0), 0, 1))
        titles = ["image"]
        for j, task in enumerate(tasks):
            pred = samples["predictions"][task]
            panels = [("ground truth", samples["inputs"][task][i], True),
                      (pred["teacher"][0], pred["teacher"][1][i], False),
                      (pred["student"][0], pred["student"][1][i], False)]
            for k, (title, value, gt) in enumerate(panels):
                arr, kw = _panel(task, value, samples, i, gt)
                axes[i, 1 + 3 * j + k].imshow(arr, interpolation="nearest", **kw)
                titles.append(f"{task}: {title}")
        if i == 0:
            for ax, title in zip(axes[0], titles):
                ax.set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_block_losses(amalgamations: Mapping, path) -> Path:
    """Per amalgamation, the final block-wise loss L^n of each output against the block n, the
    decoder candidates of Eq. 7 shaded and each teacher's chosen branch point marked."""
    plt = _pyplot()
    names = list(amalgamations)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        _loss_panel(ax, name, amalgamations[name])
    fig.tight_layout()
    return _save_figure(fig, path)


def _loss_panel(ax, name: str, summary: Mapping) -> None:
    candidates = summary.get("candidates") or []
    if candidates:
        ax.axvspan(min(candidates) - 0.5, max(candidates) + 0.5, color="0.92", label="Eq. 7 candidates")
    points = summary.get("targets", {}).get("eq7", {}).get("points", {})
    for teacher, outs in summary["outputs"].items():
        for out in outs:
            table = {int(k): v for k, v in summary["loss_table"].get(out, {}).items()}
            blocks = sorted(table)
            line, = ax.plot(blocks, [table[b] for b in blocks], marker="o", ms=3, label=out)
            p = points.get(teacher)
            if p in table:
                ax.plot([p], [table[p]], marker="*", ms=14, color=line.get_color(), markeredgecolor="k",
                        linestyle="none", label=f"{out}: branch at {p}")
    structured = f"TargetNet-2 + {name[4:].replace('_', '+').upper()}" if name.startswith("tn2_") else name
    ax.set_title(_AMALGAMATION_TITLES.get(name, structured), fontsize=9)
    ax.set_xlabel("block n")
    ax.set_ylabel("final block loss L^n (probe images)")
    if all(v > 0 for t in summary["loss_table"].values() for v in t.values()):
        ax.set_yscale("log")  # losses of different tasks differ by orders of magnitude
    ax.legend(fontsize=6)


def _save_figure(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------- writing

def write_report(out, results: Mapping, samples: Mapping | None = None, echo: bool = True) -> dict:
    """Write tables (markdown + JSON), ``results.json`` and figures to ``out``; print the tables.

    Returns file kind -> path. ``samples`` (test images and predictions, see
    :func:`plot_qualitative`) is optional: without it, no qualitative figures are drawn.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, content in format_tables(results).items():
        text = content if name.endswith(".md") else json.dumps(content, indent=1) + "\n"
        written[name] = atomic_write(out / name, text)
    written["results.json"] = atomic_write(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    if samples is not None:
        written["fig5_seg_depth.png"] = plot_qualitative(samples, ("seg", "depth"), out / "fig5_seg_depth.png")
        if "normal" in samples["predictions"]:
            written["fig6_normals.png"] = plot_qualitative(samples, ("normal",), out / "fig6_normals.png")
    if results.get("amalgamations"):
        written["block_losses.png"] = plot_block_losses(results["amalgamations"], out / "block_losses.png")
    if echo:
        print((out / "table1.md").read_text())
        print((out / "table2.md").read_text())
        print("files: " + ", ".join(str(p) for p in written.values()))
    return written

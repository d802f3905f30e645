"""The ablation's outputs: the table (markdown and JSON) and one figure (mIoU per row and student)."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write

__all__ = ["markdown", "write_outputs", "write_results"]


def _width(w: float) -> str:
    return f"1/{round(1 / w)}" if w < 1 and abs(1 / w - round(1 / w)) < 1e-9 else f"{w:g}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def markdown(results: dict) -> str:
    """Tables 3.1 / 4.2 in the thesis' layout: mIoU mean ± std over the seeds, the gain over the
    undistilled student of the same width, parameters, and the training time per step."""
    seeds, t = results["seeds"], results["teacher"]
    lines = [(f"Distillation ablation on synthetic scenes ({results['config']['resolution'][0]}x"
             f"{results['config']['resolution'][1]}, {results['config']['student_steps']} student steps, "
             f"{len(seeds)} seed(s) {seeds}, {results['device']}); mIoU on the test split, mean ± std over seeds."),
             "", "| network | width | parameters | mIoU (%) | Δ mIoU vs. student | ms / step |",
             "|---|---|---|---|---|---|",
             (f"| teacher | {_width(t['width'])} | {_params(t['parameters'])} | {100 * t['miou']:.2f} | – | "
             f"{t['ms_per_step']:.1f} |")]
    base = {}
    for row in results["rows"]:
        w = row["width"]
        if "skipped" in row:
            lines.append(f"| {row['row']} | {_width(w)} | – | skipped: {row['skipped']} | – | – |")
            continue
        if row["row"] == "student":
            base[w] = row["miou"]
        delta = "–" if row["row"] == "student" else f"{100 * (row['miou'] - base[w]):+.2f}"
        lines.append(f"| {row['row']} | {_width(w)} | {_params(row['parameters'])} | {100 * row['miou']:.2f} ± "
                     f"{100 * row['miou_std']:.2f} | {delta} | {row['ms_per_step']:.1f} |")
    ho = next((r["terms"]["ho"] for r in results["rows"] if "ho" in r.get("terms", {})), None)
    critic = f"; HO's critic A2L4 at width {ho['width']}" if isinstance(ho, dict) and "width" in ho else ""
    lines += ["", (f"Total time {results['seconds']} s. Rows: thesis Table 3.1 (PI, PA, HO, weights "
              f"10/10/0.1{critic}), Table 3.2's local graph (α = 9, β = 2×2), Table 4.2's CWD (T = 3, "
              "weight 3, last-block features).")]
    return "\n".join(lines) + "\n"


def write_results(out, results: dict) -> dict:
    """Write ``ablation.md``, ``ablation.json`` and ``ablation.png`` into ``out``; their paths."""
    return write_outputs(out, "ablation", results, markdown(results), _figure)


def write_outputs(out, stem: str, results: dict, text: str, figure, payload: dict | None = None) -> dict:
    """An experiment table's three files in ``out``, each written atomically: ``<stem>.md``
    (``text``), ``<stem>.png`` (``figure(results, path)``) and ``<stem>.json`` (``payload``,
    default ``results``, with the three paths under ``"files"``). Returns the paths (str)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    atomic_write(files["md"], text.encode())
    figure(results, files["png"])
    payload = {**(results if payload is None else payload), "files": {k: str(v) for k, v in files.items()}}
    atomic_write(files["json"], (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode())
    return {k: str(v) for k, v in files.items()}


def _figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "skipped" not in r]
    labels = list(dict.fromkeys(r["row"] for r in rows))
    widths = list(dict.fromkeys(r["width"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(labels), 3.6))
    bar = 0.8 / max(len(widths), 1)
    for i, w in enumerate(widths):
        got = {r["row"]: r for r in rows if r["width"] == w}
        xs = [j + (i - (len(widths) - 1) / 2) * bar for j, label in enumerate(labels) if label in got]
        ax.bar(xs, [100 * got[label]["miou"] for label in labels if label in got], bar,
               yerr=[100 * got[label]["miou_std"] for label in labels if label in got], capsize=3,
               label=f"student {_width(w)}")
    ax.axhline(100 * results["teacher"]["miou"], color="k", ls="--", lw=1,
               label=f"teacher {_width(results['teacher']['width'])}")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test mIoU (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

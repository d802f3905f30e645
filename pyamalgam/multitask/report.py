"""The table's outputs: markdown and JSON in seed 002's Table 1 layout, and one figure."""
from __future__ import annotations

from pathlib import Path

from ..distill.ablation_report import _params, write_outputs
from .tasks import COLUMNS

__all__ = ["markdown", "write_results"]


def _columns(results) -> list:
    present = set().union(*(r["columns"] for r in results["rows"])) if results["rows"] else set()
    return [c for c in COLUMNS if c in present]


def _fmt(key, stat) -> str:
    if key.startswith("seg/"):
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def markdown(results: dict) -> str:
    """Seed 002's Table 1: one line per row and path (T, S), mean ± std over the seeds."""
    cfg, cols = results["config"], _columns(results)
    h, w = cfg["resolution"]
    lines = [(f"Multi-task table (seed 002, Table 1) on synthetic scenes ({h}x{w}, tasks {', '.join(cfg['tasks'])}, "
              f"{cfg['steps']} steps per row, {len(results['seeds'])} seed(s) {results['seeds']}, "
              f"{results['device']}); test split, mean ± std over seeds (segmentation in %)."),
             "",
             "| method | | " + " | ".join(COLUMNS[c][1] for c in cols) + " | parameters (T) | ms / step |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for row in results["rows"]:
        cells = [_fmt(c, row["columns"][c]) if c in row["columns"] else "–" for c in cols]
        name = row["row"] + (f" ({row['baseline']})" if row["baseline"] else "") if row["path"] == "T" else ""
        lines.append(f"| {name} | {row['path']} | " + " | ".join(cells)
                     + f" | {_params(row['parameters'])} | {row['ms_per_step']:.1f} |")
    teachers = results.get("teachers") or {}
    if teachers:
        summary = "; ".join(f"{t}: " + ", ".join(f"{COLUMNS[k][1]} {_fmt(k, {'mean': v, 'std': 0.0}).split(' ±')[0]}"
                                                 for k, v in info["metrics"].items())
                            for t, info in teachers.items())
        lines += ["", f"Single-task teachers (labels; Trad. K.D.'s and the amalgamation's): {summary}."]
    lines += ["", (f"Total time {results['seconds']} s. T: the decoders' end; S: the shallow path from the encoder. "
                   "(★), (★★), full: our reading of the main paper's Eq. 5, Eq. 6 and all-task variants "
                   "(docs/multitask.md).")]
    return "\n".join(lines) + "\n"


def write_results(out, results: dict) -> dict:
    """Write ``mtl.md``, ``mtl.json`` and ``mtl.png`` into ``out``; their paths."""
    return write_outputs(out, "mtl", results, markdown(results), _figure)


def _figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = _columns(results), results["rows"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 0.9 + 0.28 * len(rows)), squeeze=False)
    labels = [f"{r['row']} {r['path']}" for r in rows]
    for ax, col in zip(axes[0], cols):
        scale = 100 if col.startswith("seg/") else 1
        means = [scale * r["columns"][col]["mean"] if col in r["columns"] else 0 for r in rows]
        stds = [scale * r["columns"][col]["std"] if col in r["columns"] else 0 for r in rows]
        colors = ["tab:blue" if r["path"] == "T" else "tab:orange" for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=2)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(COLUMNS[col][1], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

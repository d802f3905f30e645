"""The video ablation's outputs: Table 5.1's shape (markdown and JSON) and one figure, a test clip's
predictions frame by frame (ground truth, teacher, per-frame baseline, all terms)."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write
from .ablation_report import _params, _width

__all__ = ["markdown", "write_results"]

_COLUMNS = (("SF", ("pi", "pa")), ("PF", ("pf",)), ("MF", ("mf",)), ("TL", ("tl",)))


def markdown(results: dict) -> str:
    """Table 5.1's layout: a tick per term family, mIoU and TC (mean ± std over the seeds), the
    change against the per-frame student, parameters and the training time per step."""
    cfg, seeds, t = results["config"], results["seeds"], results["teacher"]
    h, w = cfg["resolution"]
    title = (f"Temporal-consistency distillation (thesis Table 5.1) on synthetic clips ({h}x{w}, training "
             f"triplets drawn from {cfg['length']}-frame clips ({cfg['policy']} policy), {cfg['student_steps']} "
             f"student steps, lambda = {cfg['lam']}, {len(seeds)} seed(s) {seeds}, {results['device']}); mIoU "
             f"over every test frame and TC over {cfg['test_frames']}-frame test clips, mean ± std over seeds.")
    teacher = (f"| teacher | {_width(t['width'])} | | | | | {100 * t['miou']:.2f} | {100 * t['tc']:.2f} | – | – | "
               f"{_params(t['parameters'])} | {t['ms_per_step']:.1f} |")
    lines = [title, "",
             "| scheme | width | SF | PF | MF | TL | mIoU (%) | TC (%) | Δ mIoU | Δ TC | parameters | ms / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", teacher]
    base = next((r for r in results["rows"] if not r["terms"]), None)
    for row in results["rows"]:
        ticks = " | ".join("✓" if set(names) <= set(row["terms"]) else "" for _, names in _COLUMNS)
        delta = ("– | –" if row is base or base is None else
                 f"{100 * (row['miou'] - base['miou']):+.2f} | {100 * (row['tc'] - base['tc']):+.2f}")
        lines.append(f"| {row['row']} | {_width(cfg['student_width'])} | {ticks} | {100 * row['miou']:.2f} ± "
                     f"{100 * row['miou_std']:.2f} | {100 * row['tc']:.2f} ± {100 * row['tc_std']:.2f} | {delta} | "
                     f"{_params(row['parameters'])} | {row['ms_per_step']:.1f} |")
    lines += ["", (f"Total time {results['seconds']} s (rendering {results['render_seconds']} s). SF = PI + PA "
                   "(Eqs. 3.1, 3.2) on every frame, PF = Eq. 5.2, MF = ConvLSTM multi-frame dependency, TL = Eq. 5.1 "
                   "with the exact visibility mask; objective Eq. 5.3, cross-entropy on the labelled (middle) frame "
                   "only. TC is an mIoU of warped neighbouring predictions: read it with the mIoU (a student that "
                   "predicts few classes is trivially consistent).")]
    return "\n".join(lines) + "\n"


def write_results(out, results: dict) -> dict:
    """Write ``video.md``, ``video.json`` and ``video.png`` into ``out``; their paths. The figure
    reads ``results["clip"]`` (tensors), which the JSON leaves out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "video.md", "json": out / "video.json", "png": out / "video.png"}
    atomic_write(files["md"], markdown(results).encode())
    _figure(results, files["png"])
    payload = {**{k: v for k, v in results.items() if k != "clip"}, "files": {k: str(v) for k, v in files.items()}}
    atomic_write(files["json"], (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode())
    return {k: str(v) for k, v in files.items()}


def _figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    clip = results["clip"]
    shown = [("image", None), ("ground truth", clip["seg"]), ("teacher", clip["teacher"])]
    shown += [(k, v) for k, v in clip.items() if k not in ("image", "seg", "teacher")]
    frames = clip["image"].shape[0]
    fig, axes = plt.subplots(len(shown), frames, figsize=(1.9 * frames, 1.5 * len(shown)), squeeze=False)
    classes = results.get("num_classes", 7)
    for r, (name, labels) in enumerate(shown):
        for t in range(frames):
            ax = axes[r][t]
            if labels is None:
                ax.imshow(clip["image"][t].permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                lab = labels[t].numpy().astype(float)
                lab[lab >= 255] = float("nan")  # unlabelled pixels: blank
                ax.imshow(lab, cmap="tab10", vmin=0, vmax=max(classes, 10) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
            if t == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

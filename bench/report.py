"""Turn a pytest-benchmark JSON of the op benchmarks into a results file and a table.

    python bench/report.py RAW.json [--out-dir bench/results]

RAW.json comes from bench/test_ops_bench.py (CPU) or bench/test_ops_cuda_bench.py (CUDA), run
with ``--benchmark-json``.

Writes ``<out-dir>/<device>-<date>.json`` (one record per op/shape/dtype/mode/layout with the
fused, eager and compiled medians, their ratios and the fused kernels' bandwidth) and the same
as a markdown table in ``<device>-<date>.md``, which is also printed; the CPU run's pair-wise
scaling and peak-memory records get tables of their own.

Ratios are speed-ups of the fused op: ``eager / fused`` and ``compile / fused`` (> 1: fused is
faster); the "paired" columns (CPU) are the median and interquartile range of per-round ratios
with the implementations interleaved round by round, which a machine whose speed drifts cannot
skew. GB/s and "% of copy" use the bytes the fused algorithm must move (see _bytes in the
benchmark) over the fused op's median device time, against the copy bandwidth measured in the
same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

IMPLS = ("fused", "eager", "compile")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown-device"


def collect(raw: dict) -> tuple[list[dict], dict]:
    """Rows keyed by (op, mode, layout, shape, dtype) with one median per implementation."""
    rows: dict[tuple, dict] = {}
    meta = {"copy_gbps": None, "device": None, "torch": None,
            "malloc": (raw.get("machine_info") or {}).get("malloc", "default")}
    for bench in raw.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        meta["copy_gbps"] = meta["copy_gbps"] or info.get("copy_gbps")
        meta["device"] = meta["device"] or info.get("device")
        meta["torch"] = meta["torch"] or info.get("torch")
        if info["op"] in ("copy", "pairwise scaling", "pairwise peak memory", "peak memory"):
            continue
        key = (info["op"], info["mode"], info.get("layout", "contiguous"), tuple(info["shape"]), info["dtype"])
        row = rows.setdefault(
            key,
            {"op": key[0], "mode": key[1], "layout": key[2], "shape": list(key[3]), "dtype": key[4],
             "bytes": info.get("bytes")},
        )
        if info["impl"] == "paired":
            for impl in ("eager", "compile"):
                row[f"paired_{impl}_over_fused"] = info.get(f"paired_{impl}_over_fused")
            continue
        ms = info.get("median_ms")
        if ms is None:  # fall back on pytest-benchmark's wall-clock median of the loop
            ms = bench["stats"]["median"] * 1e3 / max(1, info.get("inner", 1))
        row[f"{info['impl']}_ms"] = ms
    out = []
    for row in rows.values():
        fused = row.get("fused_ms")
        for impl in ("eager", "compile"):
            other = row.get(f"{impl}_ms")
            row[f"{impl}_over_fused"] = other / fused if fused and other else None
        if fused and row.get("bytes"):
            row["fused_gbps"] = row["bytes"] / (fused * 1e-3) / 1e9
            row["pct_of_copy"] = 100.0 * row["fused_gbps"] / meta["copy_gbps"] if meta["copy_gbps"] else None
        else:
            row["fused_gbps"] = row["pct_of_copy"] = None
        out.append(row)
    out.sort(key=lambda r: (r["op"], r["mode"], r["layout"], r["dtype"], r["shape"]))
    return out, meta


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def _paired(q):
    """Median (interquartile range) of the per-round ratios of test_op_paired."""
    return "–" if not q else f"{q[1]:.2f} ({q[0]:.2f}–{q[2]:.2f})"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}, torch {meta['torch']}, copy bandwidth "
        f"{_fmt(meta['copy_gbps'], '.0f')} GB/s (read + write), malloc: {meta['malloc']}.",
        "",
        "| op | mode | layout | shape | dtype | fused ms | eager ms | compile ms | eager/fused | "
        "compile/fused | eager/fused, paired | compile/fused, paired | GB/s | % of copy |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            "| {op} | {mode} | {layout} | {shape} | {dtype} | {f} | {e} | {c} | {ef} | {cf} | {pe} | {pc_} | {gb} | {pc} |".format(
                op=r["op"], mode=r["mode"], layout=r["layout"], shape="×".join(map(str, r["shape"])),
                dtype=r["dtype"], f=_fmt(r.get("fused_ms"), ".4f"), e=_fmt(r.get("eager_ms"), ".4f"),
                c=_fmt(r.get("compile_ms"), ".4f"), ef=_fmt(r["eager_over_fused"], ".2f"),
                cf=_fmt(r["compile_over_fused"], ".2f"), pe=_paired(r.get("paired_eager_over_fused")),
                pc_=_paired(r.get("paired_compile_over_fused")), gb=_fmt(r["fused_gbps"], ".0f"),
                pc=_fmt(r["pct_of_copy"], ".0f"),
            )
        )
    return "\n".join(lines) + "\n"


def pairwise_tables(raw: dict) -> str:
    """The pair-wise op's time against the number of nodes, and each op's peak memory (CPU run)."""
    scaling, peaks = [], {}
    for bench in raw.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("op") == "pairwise scaling":
            scaling.append((info["nodes"], bench["stats"]["median"] * 1e3))
        elif info.get("op") in ("peak memory", "pairwise peak memory"):  # the latter: runs before 2026-12
            case = info.get("case", "pairwise_affinity_loss B4 C64 64x64")
            peaks.setdefault(case, {})[info["impl"]] = info["peak_extra_bytes"]
    lines = []
    if scaling:
        scaling.sort()
        n0, t0 = scaling[0]
        lines += ["", "Pair-wise loss, fused, forward+backward, B=1, C=64: time against the number of nodes N.",
                  "", "| N | ms | ms per 1k nodes | time / time at N0 | N / N0 |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {t:.1f} | {1e3 * t / n:.2f} | {t / t0:.1f} | {n / n0:.0f} |" for n, t in scaling]
    if peaks:
        lines += ["", "Forward+backward (gradients to both inputs): peak resident memory added (fresh process).",
                  "", "| case | fused MiB | eager MiB | fused / eager |", "|---|---:|---:|---:|"]
        for case, by_impl in sorted(peaks.items()):
            fused, eager = by_impl.get("fused"), by_impl.get("eager")
            ratio = fused / eager if fused is not None and eager else None
            lines.append(f"| {case} | {_fmt(fused and fused / 2**20, '.0f')} | {_fmt(eager and eager / 2**20, '.0f')} | "
                         f"{_fmt(ratio, '.3f')} |")
    return "\n".join(lines) + ("\n" if lines else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    raw = json.loads(args.raw.read_text())
    rows, meta = collect(raw)
    if not rows:
        print(f"{args.raw}: no pyamalgam op benchmark records", file=sys.stderr)
        return 1
    when = raw.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat()
    date = when[:10]
    stem = f"{_slug(meta['device'] or 'unknown')}-{date}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "device": meta["device"],
        "date": date,
        "torch": meta["torch"],
        "copy_gbps": meta["copy_gbps"],
        "machine_info": raw.get("machine_info"),
        "commit_info": raw.get("commit_info"),
        "rows": rows,
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows, meta) + pairwise_tables(raw)
    (args.out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {args.out_dir / (stem + '.json')} and {args.out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

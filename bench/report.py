"""Output: the Markdown table (terminal), results.json, results.csv and speedup.png."""
from __future__ import annotations

import csv
import json
import math
import os

from .env import describe_device
from .impls import BASELINE

SHAPE_FIELDS = ["cell", "mode", "batch", "seq_len", "input_size", "hidden_size", "layers", "bidirectional", "dtype"]
SHORT = {"cell": "cell", "mode": "mode", "batch": "B", "seq_len": "T", "input_size": "I", "hidden_size": "H",
         "layers": "L", "bidirectional": "bi", "dtype": "dtype"}
CSV_FIELDS = ["device"] + SHAPE_FIELDS + ["impl", "kind", "status", "detail", "median_ms", "q1_ms", "q3_ms", "min_ms", "runs",
                             "tokens_per_s", "speedup", "gflops", "matmul_frac", "peak_mem_bytes", "flops",
                             "max_rel_err", "tol", "torch", "fusedrnn_git", "time_utc", "command"]


# ------------------------------------------------------------------ formatting
def _sig(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    mag = int(math.floor(math.log10(abs(x))))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def _si(x) -> str:
    if x is None:
        return "—"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return _sig(x / f) + unit
    return _sig(x)


def _check(row) -> str:
    s = row["status"]
    if s == "ok":
        return "ok" if row["impl"] == BASELINE else f"ok ({row['max_rel_err']:.0e})"
    d = row.get("detail") or ""
    return f"{s}: {d[:70]}" if d else s


def _field(row, k) -> str:
    v = row[k]
    if k == "cell":
        return v.upper()
    if k == "bidirectional":
        return "yes" if v else "no"
    return str(v)


def varying(rows) -> list[str]:
    return [k for k in SHAPE_FIELDS if len({r[k] for r in rows}) > 1 or k in ("cell", "mode")]


def constants_line(rows) -> str:
    parts = []
    for k in SHAPE_FIELDS:
        vals = {r[k] for r in rows}
        if len(vals) == 1 and k not in ("cell", "mode"):
            v = vals.pop()
            parts.append(f"{SHORT[k]}={'yes' if v is True else 'no' if v is False else v}")
    if rows and all(r["input_size"] == r["hidden_size"] for r in rows) and not any(p.startswith("I=") for p in parts):
        parts.append("I=H")
    return ", ".join(parts)


def markdown(rows, meta) -> str:
    cols = varying(rows)
    if "input_size" in cols and all(r["input_size"] == r["hidden_size"] for r in rows):
        cols.remove("input_size")
    dev = describe_device(meta["device"])
    v = meta["versions"]
    git = (v.get("git") or {}).get("commit")
    lines = [f"### fusedrnn benchmark on {dev}",
             "",
             f"preset `{meta['preset']}`; `{meta['command']}`; {meta['time_utc']}; torch {v['torch']}, "
             f"fusedrnn {v['fusedrnn']}" + (f" (git {git[:10]}{'+dirty' if v['git'].get('dirty') else ''})"
                                            if git else "")
             + f"; load average at start {meta.get('load_at_start')}"
             + (f", at end {meta['load_at_end']}; took {meta['wall_s']} s" if "wall_s" in meta else ""),
             ]
    for dt, mm in meta.get("matmul", {}).items():
        lines.append(f"matmul rate ({mm['n']}x{mm['n']} {dt}, median): {_sig(mm['gflops'])} GFLOP/s")
    lines.append(f"all rows: {constants_line(rows)}")
    lines.append("")
    head = [SHORT[k] for k in cols] + ["impl", "time ms", "±%", "tokens/s", "speedup", "GFLOP/s", "% mm",
                                       "peak MiB", "check"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < len(cols) + 1 or i == len(head) - 1 else "---:"
                                for i in range(len(head))) + "|")
    for r in rows:
        if r["status"] == "n/a":
            continue
        timed = r.get("median_ms") is not None
        spread = (r["q3_ms"] - r["q1_ms"]) / 2 / r["median_ms"] * 100 if timed else None
        mem = r.get("peak_mem_bytes")
        cells = [_field(r, k) for k in cols] + [
            r["impl"],
            _sig(r.get("median_ms")) if timed else "—",
            _sig(spread, 2) if timed else "—",
            _si(r.get("tokens_per_s")) if timed else "—",
            (_sig(r["speedup"]) + "x") if timed and r.get("speedup") else "—",
            _sig(r.get("gflops")) if timed else "—",
            _sig(100 * r["matmul_frac"], 2) if timed and r.get("matmul_frac") else "—",
            _sig(mem / 2**20) if timed and mem is not None else "—",
            _check(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + summary(rows)
    na = {}
    for r in rows:
        if r["status"] == "n/a":
            na.setdefault((r["impl"], r["detail"]), 0)
            na[(r["impl"], r["detail"])] += 1
    notes = [f"- {k}: {why}" for k, why in meta.get("not_run", {}).items()]
    notes += [f"- {impl}: skipped in {n} case(s): {why}" for (impl, why), n in na.items()]
    lines += ["", "time: median over interleaved runs with fresh inputs (±%: half the interquartile range); "
              "speedup: torch.nn time / time; GFLOP/s: matmul FLOPs (bench/cases.py) / time; "
              "% mm: of the matmul rate above; peak MiB: allocated during one call beyond inputs and weights; "
              "check: max relative error vs torch.nn (outputs, states and in training all gradients)."]
    if notes:
        lines += ["", "not run:"] + notes
    return "\n".join(lines)


def _geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _shape(r) -> str:
    return (f"B={r['batch']} T={r['seq_len']} H={r['hidden_size']}" + (f" L={r['layers']}" if r["layers"] > 1 else "")
            + (" bi" if r["bidirectional"] else ""))


def _case(r) -> str:
    return f"{r['cell'].upper()} {r['mode']} {_shape(r)}"


def summary(rows) -> list[str]:
    """Per implementation (torch.nn aside): the geometric mean of its speedups over
    torch.nn per cell, mode and dtype, with the slowest and fastest case; at batch <= 8 in
    inference; and the cases where it was slower than torch.nn."""
    out = []
    timed = [r for r in rows if r["status"] == "ok" and r["impl"] != BASELINE and r.get("speedup")]
    for impl in dict.fromkeys(r["impl"] for r in timed):
        mine = [r for r in timed if r["impl"] == impl]
        out.append(f"summary, {impl} against {BASELINE} (speedup: geometric mean, slowest case, fastest case):")
        groups: dict = {}
        for r in mine:
            groups.setdefault((r["cell"], r["mode"], r["dtype"]), []).append(r)
        for (cell, mode, dtype), rs in groups.items():
            lo, hi = min(rs, key=lambda r: r["speedup"]), max(rs, key=lambda r: r["speedup"])
            out.append(f"- {cell.upper()} {mode} {dtype}: {_geomean([r['speedup'] for r in rs]):.2f}x "
                       f"(min {lo['speedup']:.3g}x {_shape(lo)}, "
                       f"max {hi['speedup']:.3g}x; {len(rs)} cases)")
        small = [r["speedup"] for r in mine if r["mode"] == "inference" and r["batch"] <= 8]
        if small:
            out.append(f"- inference at batch <= 8: {_geomean(small):.2f}x (min {min(small):.3g}x)")
        slower = [r for r in mine if r["speedup"] < 1.0]
        out.append("- slower than torch.nn: " + (", ".join(f"{_case(r)} {r['speedup']:.3g}x" for r in slower)
                                                  or "none"))
    return out


# ------------------------------------------------------------------ files
def write_json(path, rows, meta):
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else str(x)
        return x
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}, f, indent=1)


def write_csv(path, rows, meta):
    """One row per (case, implementation); the device, versions and command line on every row."""
    common = {"device": describe_device(meta["device"]), "torch": meta["versions"]["torch"],
              "fusedrnn_git": (meta["versions"].get("git") or {}).get("commit"), "time_utc": meta["time_utc"],
              "command": meta["command"]}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **common})


def write_plot(path, rows, meta) -> str | None:
    """Speedup vs hidden size, one panel per batch size, one line per implementation x cell x
    mode (x any other field that varies); the same numbers as the table. Returns why no plot
    was written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except Exception as e:  # noqa: BLE001
        return f"matplotlib unavailable ({type(e).__name__}: {e})"
    batches = sorted({r["batch"] for r in rows})
    other = [k for k in varying(rows) if k not in ("batch", "hidden_size", "input_size")]
    ok = [r for r in rows if r["impl"] != BASELINE and r.get("speedup")]
    failed = sum(r["status"] in ("WRONG", "error", "oom", "unchecked") for r in rows)
    impls = sorted({r["impl"] for r in ok})
    colors = {"lstm": "tab:blue", "gru": "tab:orange", "rnn": "tab:green"}
    styles = {"inference": "-", "training": "--"}
    markers = ["o", "s", "^", "D", "v", "P", "X"]

    def label(r):
        return " ".join([r["impl"]] + [_field(r, k) if k in ("cell", "mode") else f"{SHORT[k]}={_field(r, k)}"
                                       for k in other])
    series: dict = {}          # (batch, label) -> points
    for r in ok:
        series.setdefault((r["batch"], label(r)), []).append(r)
    labels = sorted({lab for _, lab in series}) + ["torch.nn (= 1)"]

    n = len(batches) or 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width = 5.0 * ncols + 0.5
    leg_cols = max(1, min(len(labels), int(width // 3.6)))
    leg_rows = math.ceil(len(labels) / leg_cols)
    top, bottom = 0.75, 0.25 + 0.2 * leg_rows        # inches for the title and the legend
    height = 3.8 * nrows + top + bottom
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, sharey=True)
    ys = [r["speedup"] for r in ok] + [1.0]
    lo, hi = min(ys), max(ys)
    hs = sorted({r["hidden_size"] for r in rows})
    for i, b in enumerate(batches):
        ax = axes[i // ncols][i % ncols]
        drawn = False
        for (sb, lab), pts in sorted(series.items()):
            if sb != b:
                continue
            pts = sorted(pts, key=lambda r: r["hidden_size"])
            r0 = pts[0]
            ax.plot([r["hidden_size"] for r in pts], [r["speedup"] for r in pts], label=lab,
                    color=colors.get(r0["cell"]), linestyle=styles.get(r0["mode"], "-"),
                    marker=markers[impls.index(r0["impl"]) % len(markers)], markersize=5)
            drawn = True
        ax.axhline(1.0, color="gray", linewidth=1.2, linestyle=":", label="torch.nn (= 1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(hs)
        ax.set_xticklabels([str(h) for h in hs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.3, hi * 1.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if hi / lo < 20 else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("hidden size")
        if i % ncols == 0:
            ax.set_ylabel("speedup vs torch.nn (log scale)")
        ax.grid(True, which="both", alpha=0.25)
        if not drawn:
            ax.text(0.5, 0.5, "no fusedrnn implementation timed", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend([handles[lab] for lab in labels if lab in handles], [lab for lab in labels if lab in handles],
               loc="lower center", ncol=leg_cols, fontsize=8, frameon=False)
    title = f"fusedrnn speedup vs torch.nn on {describe_device(meta['device'])}\n{constants_line(rows)}"
    if failed:
        title += f"; {failed} WRONG/failed row(s) not plotted (see the table)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out_dir, rows, meta, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv"),
             "md": os.path.join(out_dir, "results.md"), "png": os.path.join(out_dir, "speedup.png")}
    if not plot:
        paths["png"] = None
    write_json(paths["json"], rows, meta)
    write_csv(paths["csv"], rows, meta)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, meta) + "\n")
    why = write_plot(paths["png"], rows, meta) if plot else None
    if why:
        paths["png"] = None
        meta.setdefault("warnings", []).append(f"plot not written: {why}")
    return paths

"""python -m bench [--preset default|quick|gpu] [--quick] [--device DEV] [--out DIR] [...]

Times every available fusedrnn backend against torch.nn (and peers when importable) over a
preset's shape grid; prints a Markdown table and writes results.json/.csv/.md and
speedup.png to --out (default bench_results/). Exit status 1 if any implementation
disagreed with torch.nn or failed.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import env, harness, impls as impls_mod, report, timing
from .cases import CELLS, MODES, PRESETS, canonical_dtype, expand, override
from .progress import Progress


def _list(conv):
    def parse(s):
        return [conv(v.strip()) for v in s.split(",") if v.strip()]
    return parse


def _bool(s):
    s = s.lower()
    if s in ("1", "true", "yes", "bi", "y"):
        return True
    if s in ("0", "false", "no", "uni", "n"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")


def _choice(options):
    def parse(s):
        s = s.lower()
        if s not in options:
            raise argparse.ArgumentTypeError(f"{s!r} is not one of {', '.join(options)}")
        return s
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="shape grid: " + "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    p.add_argument("--quick", action="store_true", help="same as --preset quick (smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backends", type=_list(str), default=None,
                   help="fusedrnn backends to time, comma-separated (default: the device's contenders, "
                        "e.g. cpu on CPU, cuda and triton on CUDA; 'reference' and 'emulated' only when named)")
    p.add_argument("--no-peers", action="store_true", help="do not time haste_pytorch / flashrnn even if importable")
    g = p.add_argument_group("grid overrides (comma-separated; replace the preset's values)")
    g.add_argument("--cells", type=_list(_choice(CELLS)))
    g.add_argument("--batch", type=_list(int))
    g.add_argument("--seq-len", type=_list(int))
    g.add_argument("--input-size", type=_list(int), help="0: same as hidden size")
    g.add_argument("--hidden", type=_list(int))
    g.add_argument("--layers", type=_list(int))
    g.add_argument("--bidirectional", type=_list(_bool), help="e.g. 0,1")
    g.add_argument("--dtype", type=_list(canonical_dtype), help="float32, bfloat16, float16, float64")
    g.add_argument("--modes", type=_list(_choice(MODES)))
    m = p.add_argument_group("measurement")
    m.add_argument("--budget", type=float, default=None, help="timed seconds per case (all implementations)")
    m.add_argument("--min-runs", type=int, default=None)
    m.add_argument("--max-runs", type=int, default=None)
    m.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation and case")
    m.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (made on the first warm-up call)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's, recorded in the output); "
                        "on a CPU shared with other work, 1 avoids threads waiting on descheduled peers")
    p.add_argument("--out", default="bench_results", help="results folder (default: bench_results/)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.preset = "quick"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    preset = PRESETS[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device available")
        if device.index is not None:
            torch.cuda.set_device(device)  # events and streams of the timed device
    grids = override(preset.grids, cells=args.cells, batch=args.batch, seq_len=args.seq_len,
                     input_size=args.input_size, hidden=args.hidden, layers=args.layers,
                     bidirectional=args.bidirectional, dtypes=args.dtype, modes=args.modes)
    cases = expand(grids)
    budget = args.budget if args.budget is not None else preset.budget_s
    min_runs = args.min_runs or preset.min_runs
    max_runs = max(args.max_runs or preset.max_runs, min_runs)
    warmup = args.warmup if args.warmup is not None else preset.warmup

    impls, not_run = impls_mod.select(device, args.backends, preset.extra_backends, peers=not args.no_peers)
    dev_info = env.device_info(device)
    print(f"fusedrnn benchmark on {env.describe_device(dev_info)}: preset {preset.name!r}, {len(cases)} cases, "
          f"implementations: {', '.join(i.name for i in impls)}", file=sys.stderr)
    if len(impls) == 1:
        print("  no fusedrnn backend to time on this device: " +
              "; ".join(f"{k}: {v}" for k, v in not_run.items() if k.startswith("fusedrnn:")), file=sys.stderr)
    if device.type == "cuda" and preset.name == "default":
        print("  (on a GPU, --preset gpu runs the full sweep)", file=sys.stderr)

    matmul = {}
    for dt in sorted({c.dtype for c in cases}):
        matmul[dt] = timing.matmul_rate(device, canonical_torch(dt))
    meta = {"command": env.command_line(argv), "preset": preset.name, "time_utc": env.now_utc(),
            "device": dev_info, "versions": env.versions(), "math_flags": env.math_flags(),
            "load_at_start": env.load(), "matmul": matmul,
            "implementations": [i.name for i in impls], "not_run": not_run,
            "measurement": {"budget_s_per_case": budget, "min_runs": min_runs, "max_runs": max_runs,
                            "warmup": warmup, "seed": args.seed, "method": timing.__doc__.strip(),
                            "flop_model": cases[0].flops.__doc__.strip() if cases else ""},
            "tolerances": {**harness.TOL, "float32_cuda_with_tf32": harness.TOL_FP32_TF32}}

    rows = []
    bar = Progress(len(cases))
    for k, case in enumerate(cases):
        bar.show(case.label())
        rows += harness.run_case(case, impls, device, seed=args.seed * 100003 + k, budget_s=budget,
                                 min_runs=min_runs, max_runs=max_runs, warmup=warmup,
                                 memory=not args.no_memory, matmul_gflops=matmul[case.dtype]["gflops"])
        bar.step()
    bar.close()
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    meta["load_at_end"] = env.load()

    paths = report.write_all(args.out, rows, meta, plot=not args.no_plot)
    print(report.markdown(rows, meta))
    print(f"\nwritten: {', '.join(p for p in paths.values() if p)} (total {meta['wall_s']} s)")
    for w in meta.get("warnings", []):
        print("warning:", w, file=sys.stderr)
    bad = [r for r in rows if r["status"] in ("WRONG", "error", "unchecked")]
    if bad:
        print(f"\n{len(bad)} row(s) WRONG or failed:", file=sys.stderr)
        for r in bad:
            print(f"  {r['impl']} {r['cell'].upper()} B={r['batch']} T={r['seq_len']} H={r['hidden_size']} "
                  f"{r['dtype']} {r['mode']}: {r['status']}: {r['detail']}", file=sys.stderr)
        return 1
    return 0


def canonical_torch(dt: str) -> torch.dtype:
    from .cases import DTYPES
    return DTYPES[dt]


if __name__ == "__main__":
    sys.exit(main())

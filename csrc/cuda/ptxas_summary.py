#!/usr/bin/env python3
"""Summarize the ptxas resource report (-Xptxas=-v) of the fusedrnn CUDA kernels.

    python csrc/cuda/ptxas_summary.py BUILD_LOG      (or the log on stdin)

The build (setup.py build_ext, as run by dev.py/CI) prints ptxas's raw report for every
kernel and architecture; this turns it into one demangled row per kernel and arch:
registers, stack frame, spill stores/loads, static shared memory, and the dynamic shared
memory the launchers request (ptxas cannot see it; computed from the tile constants in
csrc/cuda/kernels/common.cuh). Exits 1 if any step kernel spills more than 64 bytes, or
any persistent kernel spills at all. The persistent kernels (kernels/persistent.cuh) take
every size at run time: their one row per cell/direction/dtype is the report for every
hidden size (256, 512, 1024, ...); their dynamic shared memory depends on the call and is
listed below the table for the default configurations (PERSISTENT.md).
"""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def tile_constants():
    src = open(os.path.join(HERE, "kernels", "common.cuh")).read()
    return {k: int(re.search(rf"constexpr int {k} = (\d+);", src).group(1)) for k in ("TN", "TB", "KC")}


def dynamic_smem(name, c):
    nt = lambda ng: 4 * (c["TB"] * (c["KC"] + 1) + ng * c["TN"] * (c["KC"] + 1))  # noqa: E731
    nn = 4 * (c["TB"] * (c["KC"] + 1) + c["KC"] * (c["TN"] + 1))
    for key, val in (("lstm_fwd_step", nt(4)), ("gru_fwd_step", nt(3)), ("rnn_fwd_step", nt(1)),
                     ("lstm_proj_step", nt(1)), ("_bwd_", nn)):
        if key in name:
            return val
    return 0


def persistent_footprints():
    """Dynamic shared memory of the persistent kernels (formula of persistent_smem() in
    kernels/persistent.cuh) for LSTM at batch 16 on an A100 (108 SMs, 163 KB per block)
    and an H100 (132 SMs, 227 KB), per hidden size, at the batch chunk the planner picks."""
    src = open(os.path.join(HERE, "kernels", "persistent.cuh")).read()
    threads = int(re.search(r"constexpr int kPThreads = (\d+);", src).group(1))
    a16 = lambda x: (x + 15) // 16 * 16  # noqa: E731

    up = lambda x, m: (x + m - 1) // m * m  # noqa: E731

    def smem(na, K, U, bch, elem, mma):
        if mma:  # tensor-core layout (persistent_smem_mma)
            ks, rp, bp = up(K, 16) + 8, up(na * U, 8), up(bch, 16)
            return a16(rp * ks * 2) + 2 * a16(bp * ks * 2) + 4 * max(bp * rp, 128 * threads // 32)
        return a16(na * U * K * elem) + a16(bch * K * 4) + na * max(threads, bch * U) * 4

    def plan(na, K, H, B, elem, sms, limit):  # plan_persistent(): tensor cores first for 2-byte types
        U = -(-H // sms)
        for mma in ((True, False) if elem == 2 else (False,)):
            for bch in range(B, 0, -1):
                need = smem(na, K, U, bch, elem, mma)
                if need <= limit:
                    return f"{need // 1024}K/b{bch}{'/mma' if mma else ''}"
        return "no fit"
    out = ["persistent kernels, dynamic smem per block / batch chunk[/mma: tensor cores], LSTM B=16 (fwd | bwd):"]
    for dev, sms, limit in (("A100", 108, 163 * 1024), ("H100", 132, 227 * 1024)):
        for dt, elem in (("fp32", 4), ("bf16", 2)):
            cells = [f"H={H}: {plan(4, H, H, 16, elem, sms, limit)} | {plan(1, 4 * H, H, 16, elem, sms, limit)}"
                     for H in (256, 512, 1024)]
            out.append(f"  {dev} {dt}: " + ", ".join(cells))
    return "\n".join(out)


def parse(lines):
    rows, cur = [], None
    for line in lines:
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
            rows.append(cur)
            cur = None
    return rows


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main():
    lines = open(sys.argv[1]).read().splitlines() if len(sys.argv) > 1 else sys.stdin.read().splitlines()
    rows = [r for r in parse(lines) if "fusedrnn" in r["mangled"]]
    if not rows:
        print("ptxas summary: no fusedrnn kernels in the log (CUDA not built?)")
        return 0
    c = tile_constants()
    seen, bad = set(), []
    print(f"{'kernel':<72} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>5} {'dyn smem':>8}")
    for r, name in sorted(zip(rows, demangle([r["mangled"] for r in rows])), key=lambda x: (x[1], x[0]["arch"])):
        name = re.sub(r"^void fusedrnn::cuda::", "", name).split("(")[0]
        if (name, r["arch"]) in seen:
            continue
        seen.add((name, r["arch"]))
        print(f"{name:<72} {r['arch']:<6} {r['regs']:>4} {r['stack']:>5} {r['spill_st']:>5}/{r['spill_ld']:<5} "
              f"{r['smem']:>5} {dynamic_smem(name, c):>8}")
        if "step" in name and r["spill_st"] > 64:
            bad.append(name)
        if "persistent_kernel" in name and (r["spill_st"] or r["spill_ld"] or r["stack"]):
            bad.append(name)
    if any("persistent_kernel" in r["mangled"] for r in rows):
        print(persistent_footprints())
    if bad:
        print("kernels spilling more than 64 bytes:", ", ".join(sorted(set(bad))))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

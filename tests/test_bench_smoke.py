"""CI smoke test of the benchmark CLI: `python -m bench --quick` end to end (no timing thresholds).

Checks that the table, results.json, results.csv and speedup.png are produced, that every
implementation that ran agreed with torch.nn, and that the numbers are sane (positive,
finite), with the device, versions and command line recorded.
"""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "results"
    # One thread: CI machines are shared, and with several threads a tiny op can wait long
    # for a descheduled peer thread; the numbers are not judged here anyway.
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    # The Markdown table on the terminal.
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| cell | mode |") and "speedup" in table[0] and "check" in table[0]
    assert any("| torch.nn |" in line for line in table[1:])
    assert "fusedrnn benchmark on CPU" in proc.stdout or "fusedrnn benchmark on CUDA" in proc.stdout

    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"]["type"] in ("cpu", "cuda") and meta["device"]["name"]
    assert meta["versions"]["torch"] and meta["command"].startswith("python -m bench --quick")
    assert meta["matmul"]["float32"]["gflops"] > 0
    ran = [r for r in rows if r["status"] != "n/a"]
    assert len(ran) == len(table) - 1  # header + every checked row; the n/a rows are listed below it
    impls = {r["impl"] for r in ran}
    assert "torch.nn" in impls and "fusedrnn:reference" in impls  # the quick preset always runs the spec
    for r in ran:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"]) and r["runs"] >= 3, r
        assert r["speedup"] > 0 and math.isfinite(r["speedup"]), r
        assert r["tokens_per_s"] > 0 and r["gflops"] > 0 and r["flops"] > 0, r
        assert r["max_rel_err"] <= r["tol"], r
        if r["impl"] == "torch.nn":
            assert r["speedup"] == 1.0
    cells = {(r["cell"], r["mode"]) for r in ran}
    assert cells >= {(c, m) for c in ("lstm", "gru", "rnn") for m in ("inference", "training")}
    assert any(r["layers"] == 2 and r["bidirectional"] for r in ran)

    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and {r["impl"] for r in csv_rows} >= impls
    assert all(r["device"] and r["torch"] and r["command"] == meta["command"] for r in csv_rows)

    png = (out / "speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "results.md").read_text().strip() in proc.stdout

    # The summary under the table: each implementation's geometric mean per cell and mode,
    # computed from the rows above.
    for impl in impls - {"torch.nn"}:
        assert f"summary, {impl} against torch.nn" in proc.stdout
        lstm_inf = [r["speedup"] for r in ran if r["impl"] == impl and (r["cell"], r["mode"]) == ("lstm", "inference")]
        if lstm_inf:
            gm = math.exp(sum(map(math.log, lstm_inf)) / len(lstm_inf))
            summary = proc.stdout[proc.stdout.index(f"summary, {impl} against torch.nn"):]
            assert f"- LSTM inference float32: {gm:.2f}x" in summary


def test_cpu_ops_script_runs(tmp_path):
    """bench/cpu_ops.py (the CPU kernels against torch.nn, issue grid) at tiny sizes: it runs,
    checks that both implementations agree (it asserts that itself), prints every case (each
    input size asked: 0 is the hidden size) with its pair-quartile band and the summary lines."""
    proc = subprocess.run([sys.executable, "bench/cpu_ops.py", "--batch", "1,3", "--hidden", "16", "--seq", "9",
                           "--input-size", "0,5", "--reps", "4", "--threads", "1",
                           "--modes", "inference,training,training-frozen-input"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "cpu backend unavailable" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["lstm"], ["gru"], ["rnn"])]
    assert len(rows) == 3 * 3 * 2 * 2  # cells x modes x input sizes x batches
    assert {r[1] for r in rows} == {"inference", "training", "training-frozen-input"}
    assert {r[4] for r in rows} == {"16", "5"} and "input_size 0,5" in proc.stdout
    for r in rows:
        t_ref, t_mine, speedup = float(r[5]), float(r[6]), float(r[7].rstrip("x"))
        q1, q3 = map(float, r[8].split("-"))
        # (the times are printed to 1 us: at tens of us that rounding alone moves their ratio
        # by 3%, e.g. 0.048 / 0.032 ms printed for a speedup of 1.47x)
        lo, hi = (t_ref - 5e-4) / (t_mine + 5e-4), (t_ref + 5e-4) / (t_mine - 5e-4)
        assert t_ref > 0 and t_mine > 0 and lo - 0.01 <= speedup <= hi + 0.01, r
        assert 0 < q1 <= q3
    assert "cases slower than torch.nn (median): " in proc.stdout and "geomean speedup all" in proc.stdout


# (extra arguments, what the header says): bfloat16 / float16 (backend 'cpu' against
# torch.nn's own low-precision kernels; 5 steps: float32 compute), and float32 under
# --matmul-precision medium (bfloat16 products; 9 steps: fusedrnn's bfloat16 kernels where
# the CPU has them). The script's own check that both agree passes at the dtype's tolerance.
LOW_PRECISION_RUNS = [(["--dtype", "bfloat16", "--seq", "5"], "input_size = hidden, bfloat16,"),
                      (["--dtype", "float16", "--seq", "5"], "input_size = hidden, float16,"),
                      (["--matmul-precision", "medium", "--seq", "9"], "float32, float32 matmul precision medium,")]


@pytest.mark.parametrize("extra,header", LOW_PRECISION_RUNS, ids=["bf16", "fp16", "fp32-medium"])
def test_cpu_ops_script_low_precision(extra, header):
    """Every case printed, with the dtype and precision in the header."""
    proc = subprocess.run([sys.executable, "bench/cpu_ops.py", "--batch", "2", "--hidden", "16", "--reps", "3",
                           "--threads", "1", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "cpu backend unavailable" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert header in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["lstm"], ["gru"], ["rnn"])]
    assert len(rows) == 3 * 2 and all(float(r[7].rstrip("x")) > 0 for r in rows)


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_train_loop_script_reports_both_implementations(mode):
    """bench/train_loop.py (one model per process, allocator costs included) end to end at a
    tiny size: both implementations ran and reported positive, finite numbers."""
    proc = subprocess.run([sys.executable, "bench/train_loop.py", "--batch", "2", "--hidden", "16", "--seq", "3",
                           "--iters", "2", "--rounds", "1", "--mode", mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for impl in ("torch.nn", "fusedrnn:cpu"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(impl))
        ms = float(line.split()[1])
        assert math.isfinite(ms) and ms > 0, line
    assert "speedup (torch.nn / fusedrnn):" in proc.stdout


def test_cells_script_reports_every_case():
    """bench/cells.py (the cells, one step per call) at tiny sizes: one row per cell, mode and
    shape, each with positive finite times and a speedup."""
    proc = subprocess.run([sys.executable, "bench/cells.py", "--shapes", "8x2,16x3", "--rounds", "1",
                           "--block-ms", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] and ln.split()[0].endswith("Cell")]
    assert len(rows) == 3 * 2 * 2, proc.stdout
    for r in rows:
        t_ref, t_mine = float(r[4]), float(r[5])
        assert math.isfinite(t_ref) and math.isfinite(t_mine) and t_ref > 0 and t_mine > 0, r
        assert r[6].endswith("x"), r


def test_double_backward_script_reports_every_case():
    """bench/double_backward.py (a gradient-penalty step) at tiny sizes: one row per module
    (sequence modules and cells) and shape, each with positive finite times and a speedup."""
    proc = subprocess.run([sys.executable, "bench/double_backward.py", "--shapes", "8x2", "--seq", "5",
                           "--rounds", "1", "--block-ms", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in kinds]
    assert len(rows) == 6, proc.stdout
    for r in rows:
        t_ref, t_mine = float(r[3]), float(r[4])
        assert math.isfinite(t_ref) and math.isfinite(t_mine) and t_ref > 0 and t_mine > 0, r
        assert r[5].endswith("x") and r[6] == "cpu", r
    assert proc.stdout.startswith("device: CPU: "), proc.stdout


def test_packed_script_reports_every_case():
    """bench/packed.py (PackedSequence batches) at tiny sizes: one row per cell, mode and
    shape, each with positive finite times, a speedup and the backend that ran."""
    proc = subprocess.run([sys.executable, "bench/packed.py", "--shapes", "8x3", "--seq", "6", "--rounds", "1",
                           "--block-ms", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: CPU: "), proc.stdout
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in ("LSTM", "GRU", "RNN")]
    assert len(rows) == 3 * 2, proc.stdout
    for r in rows:
        t_ref, t_mine = float(r[4]), float(r[5])
        assert math.isfinite(t_ref) and math.isfinite(t_mine) and t_ref > 0 and t_mine > 0, r
        assert r[6].endswith("x") and r[7] == "cpu", r

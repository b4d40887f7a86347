"""One case end to end: same weights everywhere, correctness against torch.nn, then timing.

An implementation is timed only if its outputs (and, in training, its gradients) match
torch.nn's on the same input within the dtype's tolerance: a wrong fast kernel is
reported as WRONG with its error, never with a time.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import timing
from .cases import Case
from .impls import BASELINE, Impl, Runner, torch_module

# Max |a - b| / max |b| allowed against torch.nn, per dtype. fp32 on CUDA is looser when
# cuDNN may use TF32 (PyTorch's default: torch.backends.cudnn.allow_tf32 = True).
TOL = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}
TOL_FP32_TF32 = 2e-2


def tolerance(case: Case, device: torch.device) -> float:
    if case.dtype == "float32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return TOL_FP32_TF32
    return TOL[case.dtype]


def failure_status(e: BaseException) -> str:
    """"oom" (the case does not fit this device: reported, not a failure) or "error"."""
    return "oom" if isinstance(e, torch.OutOfMemoryError) else "error"


def free_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-12) if a.numel() else 0.0


def outputs(runner: Runner, case: Case, x0: torch.Tensor, g0: Optional[torch.Tensor]) -> dict:
    """Everything compared with torch.nn: output, final states, and in training the gradients."""
    runner.set_mode(case.mode)
    runner.zero_grad()
    if case.mode == "inference":
        with torch.no_grad():
            y, hs = runner(x0)
        out = {"output": y}
    else:
        x = x0.clone().requires_grad_()
        y, hs = runner(x)
        y.backward(g0)
        out = {"output": y.detach(), "grad_input": x.grad}
        out.update({f"grad_{k}": v for k, v in runner.grads().items()})
        runner.zero_grad()
    names = ["h_n", "c_n"] if case.cell == "lstm" else ["h_n"]
    out.update({n: h.detach() for n, h in zip(names, hs)})
    return out


def check(got: dict, want: dict, param_grads: bool) -> tuple[float, str]:
    """(worst relative error, name of the worst tensor)."""
    worst, where = 0.0, ""
    for k, ref in want.items():
        if k.startswith("grad_") and k != "grad_input" and not param_grads:
            continue
        if k not in got:
            return float("inf"), f"{k} missing"
        e = rel_err(got[k], ref)
        if e >= worst:
            worst, where = e, k
    return worst, where


def timed_call(runner: Runner, case: Case, device: torch.device):
    """(prepare, run): fresh input (and output gradient) per run, made before the clock starts."""
    T, B, I = case.seq_len, case.batch, case.input_size
    out_features = case.directions * case.hidden_size
    dt = case.torch_dtype
    train = case.mode == "training"

    def prepare():
        runner.zero_grad()
        x = torch.randn(T, B, I, device=device, dtype=dt, requires_grad=train)
        g = torch.randn(T, B, out_features, device=device, dtype=dt) if train else None
        return x, g

    if train:
        def run(args):
            x, g = args
            y, _ = runner(x)
            y.backward(g)
    else:
        def run(args):
            with torch.no_grad():
                runner(args[0])
    return prepare, run


def run_case(case: Case, impls: list[Impl], device: torch.device, *, seed: int, budget_s: float,
             min_runs: int, max_runs: int, warmup: int, memory: bool = True,
             matmul_gflops: Optional[float] = None) -> list[dict]:
    """Rows (one per implementation) for one case."""
    ref_module = torch_module(case, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x0 = torch.randn(case.seq_len, case.batch, case.input_size, generator=gen).to(device, case.torch_dtype)
    g0 = (torch.randn(case.seq_len, case.batch, case.directions * case.hidden_size, generator=gen)
          .to(device, case.torch_dtype) if case.mode == "training" else None)
    tol = tolerance(case, device)
    rows: dict[str, dict] = {}
    runners: dict[str, Runner] = {}
    want = None
    for impl in impls:  # torch.nn first
        row = rows[impl.name] = {**case.to_dict(), "impl": impl.name, "kind": impl.kind, "status": "n/a",
                                 "detail": "", "max_rel_err": None, "tol": tol}
        why = impl.refuses(case, device)
        if why:
            row["detail"] = why
            continue
        try:
            runner = impl.build(case, ref_module, device)
            got = outputs(runner, case, x0, g0)
        except Exception as e:  # noqa: BLE001 - reported in the table
            row.update(status=failure_status(e), detail=f"{type(e).__name__}: {e}"[:300])
            free_cached(device)
            continue
        if impl.name == BASELINE:
            want = got
            row.update(status="ok", max_rel_err=0.0, detail="reference for the check")
            runners[impl.name] = runner
            continue
        if want is None:
            row.update(status="unchecked", detail="torch.nn failed; not timed")
            continue
        err, where = check(got, want, impl.compare_param_grads)
        row["max_rel_err"] = err
        if err <= tol:
            row.update(status="ok", detail=f"worst: {where}")
            runners[impl.name] = runner
        else:
            row.update(status="WRONG", detail=f"{where}: rel. error {err:.2e} > tol {tol:.0e}")
        del got
    del want

    calls = {name: timed_call(r, case, device) for name, r in runners.items()}
    for r in runners.values():
        r.set_mode(case.mode)
    peak: dict[str, Optional[int]] = {}

    def measure_memory(name, call):  # on the first warm-up call: no extra call for memory
        peak[name] = timing.peak_memory(call, device)

    results = timing.time_interleaved(calls, device, budget_s=budget_s, min_runs=min_runs,
                                      max_runs=max_runs, warmup=warmup,
                                      wrap_first_warmup=measure_memory if memory else None)
    flops = case.flops()
    base = results.get(BASELINE, {}).get("median_ms")
    for name, res in results.items():
        row = rows[name]
        if "error" in res:
            row.update(status=res.get("status", "error"), detail=res["error"][:300])
            continue
        ms = res["median_ms"]
        row.update(res)
        row["tokens_per_s"] = case.tokens / (ms / 1e3)
        row["speedup"] = base / ms if base else None
        row["gflops"] = flops / (ms / 1e3) / 1e9
        row["matmul_frac"] = row["gflops"] / matmul_gflops if matmul_gflops else None
        row["peak_mem_bytes"] = peak.get(name)
    for row in rows.values():
        row["flops"] = flops
    del runners, calls
    free_cached(device)
    return list(rows.values())

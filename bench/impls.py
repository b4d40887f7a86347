"""The implementations being compared, each built for one case with the same weights.

  * "torch.nn"       the baseline: torch.nn.LSTM/GRU/RNN (cuDNN on CUDA; on the CPU oneDNN
                     for LSTM, ATen's own loop for GRU/RNN);
  * "fusedrnn:<b>"   fusedrnn.LSTM/GRU/RNN forced to backend <b>, with torch.nn's state_dict;
  * peers            haste_pytorch, flashrnn, when importable (weights converted from torch.nn).

A Runner maps an input [T, B, I] to (output [T, B, D*H], [h_n(, c_n)]) and can list its
parameter gradients under torch.nn's names, so results can be compared with torch.nn.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case

TORCH_CLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
BASELINE = "torch.nn"
# Backends that are never timed unless named: the spec (a Python time loop) and the CUDA
# kernels under CPU emulation (a test vehicle); Triton on CPU tensors only runs interpreted.
NOT_CONTENDERS = {"reference", "emulated"}


class Runner:
    def __init__(self, module: nn.Module, forward: Optional[Callable] = None, named_params=None):
        self.module = module
        self._forward = forward
        self._named = named_params  # name -> tensor whose .grad matches torch.nn's param of that name

    def __call__(self, x):
        if self._forward is not None:
            return self._forward(x)
        y, hs = self.module(x)
        return y, list(hs) if isinstance(hs, tuple) else [hs]

    def parameters(self):
        return [p for p in self.module.parameters()] if self._named is None else list(self._named.values())

    def grads(self) -> dict:
        named = dict(self.module.named_parameters()) if self._named is None else self._named
        return {k: p.grad for k, p in named.items() if p.grad is not None}

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def set_mode(self, mode: str):
        self.module.train(mode == "training")


@dataclass
class Impl:
    name: str
    kind: str                                   # "baseline" | "fusedrnn" | "peer"
    unavailable: Optional[str] = None           # why it cannot run in this process at all
    compare_param_grads: bool = True            # peers keep their own parameter layout
    _refuses: Callable[[Case, torch.device], Optional[str]] = field(default=lambda c, d: None, repr=False)
    _build: Optional[Callable[[Case, nn.Module, torch.device], Runner]] = field(default=None, repr=False)

    def refuses(self, case: Case, device: torch.device) -> Optional[str]:
        return self.unavailable or self._refuses(case, device)

    def build(self, case: Case, ref: nn.Module, device: torch.device) -> Runner:
        return self._build(case, ref, device)


def torch_module(case: Case, device: torch.device, seed: int) -> nn.Module:
    """The torch.nn module of a case, initialised from `seed`; every other implementation copies it."""
    torch.manual_seed(seed)
    m = TORCH_CLS[case.cell](case.input_size, case.hidden_size, num_layers=case.layers,
                             bidirectional=case.bidirectional)
    return m.to(device=device, dtype=case.torch_dtype)


# ------------------------------------------------------------------ torch.nn
def _baseline() -> Impl:
    return Impl(BASELINE, "baseline", _build=lambda case, ref, device: Runner(ref))


# ------------------------------------------------------------------ fusedrnn
def _fusedrnn(name: str) -> Impl:
    import fusedrnn
    from fusedrnn.backends import Call, registry

    be = registry()[name]

    def refuses(case, device):
        return be.refuses(Call(cell=case.cell, device=device, dtype=case.torch_dtype,
                               hidden_size=case.hidden_size, batch=case.batch))

    def build(case, ref, device):
        cls = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn": fusedrnn.RNN}[case.cell]
        m = cls(case.input_size, case.hidden_size, num_layers=case.layers,
                bidirectional=case.bidirectional, backend=name).to(device=device, dtype=case.torch_dtype)
        m.load_state_dict(ref.state_dict())
        runner = Runner(m)

        def forward(x):
            y, hs = m(x)
            if m.last_backend != name:  # would make the row lie about what was timed
                raise RuntimeError(f"asked for backend {name!r} but {m.last_backend!r} ran "
                                   f"({m.last_backend_reason})")
            return y, list(hs) if isinstance(hs, tuple) else [hs]
        runner._forward = forward
        return runner

    return Impl(f"fusedrnn:{name}", "fusedrnn", unavailable=be.unavailable(), _refuses=refuses, _build=build)


def fusedrnn_backends(device: torch.device) -> dict:
    """name -> None if usable on `device` in this process, else why not (every registered backend)."""
    try:
        from fusedrnn.backends import registry
    except Exception as e:  # noqa: BLE001
        return {"fusedrnn": f"import failed: {type(e).__name__}: {e}"}
    out = {}
    for name, be in registry().items():
        why = be.unavailable()
        if why is None and device.type not in be.device_types:
            why = f"runs on {'/'.join(be.device_types)} tensors, not {device.type}"
        out[name] = why
    return out


def contenders(device: torch.device) -> list[str]:
    """The fusedrnn backends timed by default on `device`."""
    names = [n for n, why in fusedrnn_backends(device).items() if why is None and n not in NOT_CONTENDERS]
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]  # interpreter only on CPU tensors
    return names


# ------------------------------------------------------------------ peers
def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - missing or broken install
        return None, ("not installed" if isinstance(e, ModuleNotFoundError) and e.name == name
                      else f"import failed: {type(e).__name__}: {e}")


def _single_layer_only(case: Case, device: torch.device, cells, dtypes) -> Optional[str]:
    if device.type != "cuda":
        return "CUDA only"
    if case.cell not in cells:
        return f"no {case.cell.upper()} comparable to torch.nn's"
    if case.layers != 1 or case.bidirectional:
        return "single-layer unidirectional only"
    if case.dtype not in dtypes:
        return f"not benchmarked in {case.dtype}"
    return None


def _haste() -> Impl:
    # haste_pytorch.LSTM/GRU(input_size, hidden_size): one layer, one direction, CUDA; weights
    # loaded with from_native_weights (torch.nn layout). Not installed where this was written,
    # so this adapter has not been run; the correctness check guards the table against it.
    mod, why = _import("haste_pytorch")

    def build(case, ref, device):
        cls = {"lstm": mod.LSTM, "gru": mod.GRU}[case.cell]
        m = cls(case.input_size, case.hidden_size).to(device=device, dtype=case.torch_dtype)
        m.from_native_weights(ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0)

        def forward(x):
            y, state = m(x)
            return y, list(state) if isinstance(state, tuple) else [state]
        return Runner(m, forward=forward)

    return Impl("haste_pytorch", "peer", unavailable=why, compare_param_grads=False,
                _refuses=lambda c, d: _single_layer_only(c, d, ("lstm", "gru"), ("float32",)), _build=build)


def _flashrnn() -> Impl:
    # flashrnn.flashrnn(Wx[B,T,4,1,H], R[4,1,H,H], b[4,1,H], function="lstm") with gates i,f,z,o
    # (torch.nn's i,f,g,o); the input projection is done here with F.linear, as fusedrnn does.
    # Not installed where this was written: this adapter has not been run; the correctness
    # check guards the table against it.
    mod, why = _import("flashrnn")
    fn = mod
    while fn is not None and not callable(fn):
        fn = getattr(fn, "flashrnn", None)
    if mod is not None and fn is None:
        why = "flashrnn.flashrnn function not found"

    def build(case, ref, device):
        H = case.hidden_size
        w_ih = ref.weight_ih_l0.detach().clone().requires_grad_()
        R = ref.weight_hh_l0.detach().view(4, 1, H, H).clone().requires_grad_()
        b = (ref.bias_ih_l0 + ref.bias_hh_l0).detach().view(4, 1, H).clone().requires_grad_()
        holder = nn.Module()  # for train()/eval()

        def forward(x):
            T, B, _ = x.shape
            wx = F.linear(x, w_ih).transpose(0, 1).reshape(B, T, 4, 1, H)
            h, last = fn(wx, R, b, function="lstm", backend="cuda_fused", dtype=case.dtype)
            y = h[0, :, :, 0].transpose(0, 1)                 # [T, B, H]
            return y, [last[0, :, -1, 0].unsqueeze(0), last[1, :, -1, 0].unsqueeze(0)]
        return Runner(holder, forward=forward, named_params={"w_ih": w_ih, "R": R, "b": b})

    return Impl("flashrnn", "peer", unavailable=why, compare_param_grads=False,
                _refuses=lambda c, d: _single_layer_only(c, d, ("lstm",), ("float32", "bfloat16", "float16")),
                _build=build)


PEERS = {"haste_pytorch": _haste, "flashrnn": _flashrnn}


def select(device: torch.device, backends: Optional[list[str]], extra: tuple = (), peers: bool = True):
    """The implementations of a run: torch.nn, the fusedrnn backends, the peers.

    backends None: the contenders on `device` plus `extra` (a preset's). Returns
    (impls, notes) where notes says why a requested or known implementation is absent.
    """
    notes: dict[str, str] = {}
    avail = fusedrnn_backends(device)
    if backends is None:
        names = contenders(device) + [n for n in extra if avail.get(n) is None and n not in contenders(device)]
    else:
        names = list(backends)
    impls = [_baseline()]
    for name in names:
        if name not in avail:
            notes[f"fusedrnn:{name}"] = f"unknown backend (known: {', '.join(sorted(avail))})"
        elif avail[name] is not None:
            notes[f"fusedrnn:{name}"] = avail[name]
        else:
            impls.append(_fusedrnn(name))
    for name, why in avail.items():
        key = f"fusedrnn:{name}"
        if key in notes or name in names:
            continue
        if why is not None:
            notes[key] = why
        elif name in NOT_CONTENDERS:
            notes[key] = f"not a contender, timed only when named (--backends {name})"
    if backends is None and device.type == "cpu" and avail.get("triton") is None:
        notes["fusedrnn:triton"] = "not timed on CPU (Triton interpreter only)"
    for name, make in PEERS.items():
        impl = make()
        if impl.unavailable:
            notes[name] = impl.unavailable
        elif peers:
            impls.append(impl)
    return impls, notes

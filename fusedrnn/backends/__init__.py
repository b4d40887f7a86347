"""Backend registry and choice.

A backend implements the recurrence op contract (fusedrnn/schema.py) for some
devices and dtypes. `select` resolves a module's `backend=` argument for one
call: a forced name is used or refused with a clear reason; "auto" takes the
first backend in AUTO_ORDER that can run the call, and says why.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from .. import ops
from ..contract import GATES


class Call(NamedTuple):
    """What a backend needs to know to accept or refuse one recurrence call.
    (A NamedTuple: cheap to build on every step of a cell, and a key of select's cache.)"""
    cell: str                 # "lstm" | "gru" | "rnn"
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    proj_size: int = 0        # LSTM projection (0: none)
    batch: int = 1


@dataclass
class Backend:
    name: str
    ops_backend: str                              # which op names it registers (schema.SUFFIX key)
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    load: Callable[[], Optional[str]]             # makes the backend usable; returns why not, or None
    limits: Callable[[Call], Optional[str]] = field(default=lambda call: None)  # why a call is refused
    # What the backend's kernels chose in its latest call, and why (e.g. the CUDA
    # backend's persistent vs per-step kernels); None if it has no such choice.
    kernel_choice: Optional[Callable[[], str]] = None
    # Whether the backend implements the one-step cell ops (fusedrnn/cell_ops.py); if not,
    # fusedrnn's cells run a step as the input projection plus the sequence op with T = 1.
    cell_ops: bool = False
    # Whether the backend implements the input projection op fusedrnn::projection
    # (fusedrnn/projection.py); if not, the sequence modules' input projection is F.linear.
    projection_op: bool = False
    # Whether the backend runs a bidirectional layer's two directions in one op call in
    # inference (fusedrnn/bidirectional.py: the cpu backend).
    direction_pairs: bool = False
    # Dtypes the backend's ops lack but whose calls it runs in float32: the modules cast
    # input, states and weights to float32 and the results back (the cpu backend's float16
    # and bfloat16, where torch.nn's CPU kernels are slow; see LOW_PRECISION).
    float32_for: tuple[torch.dtype, ...] = ()
    # Whether the forward ops take a bfloat16 w_hh with float32 everything else for a
    # sequence of T steps and run its products on bfloat16 dot products (the cpu backend on
    # AVX512-BF16; their backward runs float32): then a bfloat16 module keeps w_hh and the
    # input projection in bfloat16 (modules.py). None: never.
    bf16_recurrence: Optional[Callable[[int], bool]] = None
    # Whether select checks the backend's ops against the reference on the call's device
    # before their first use for a configuration (fusedrnn/verify.py: kernels that CI runs
    # only under emulation or an interpreter).
    verify_on_device: bool = False
    _state: Optional[str] = field(default="unloaded", repr=False)
    _ops: dict = field(default_factory=dict, repr=False)

    def unavailable(self) -> Optional[str]:
        """None if the backend can be used in this process, else the reason."""
        if self._state == "unloaded":
            with _LOAD_LOCK:  # (modules built in several threads at once: load once)
                if self._state == "unloaded":
                    try:
                        self._state = self.load()
                    except Exception as e:  # a broken build must not break the package
                        self._state = f"failed to load: {type(e).__name__}: {e}"
        return self._state

    def refuses(self, call: Call) -> Optional[str]:
        """None if this backend can run `call`, else the reason it cannot."""
        why = self.unavailable()
        if why:
            return why
        if call.device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {call.device.type}"
        if call.dtype not in self.dtypes and call.dtype not in self.float32_for:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes + self.float32_for)
            return f"supports dtypes {names}, not {str(call.dtype).replace('torch.', '')}"
        return self.limits(call)

    def op(self, cell: str, direction: str):
        hit = self._ops.get((cell, direction))  # (looked up once: modules ask on every forward)
        if hit is not None:
            return hit
        why = self.unavailable()  # loading registers the kernels
        if why:
            raise RuntimeError(f"fusedrnn: backend {self.name!r} is unavailable: {why}")
        hit = self._ops[(cell, direction)] = ops.get_op(cell, direction, self.ops_backend)
        return hit

    def cell_op(self, cell: str):
        """The backend's one-step op for `cell` (fusedrnn/cell_ops.py), or None if it has none."""
        return self.op(cell, "cell") if self.cell_ops else None


_REGISTRY: dict[str, Backend] = {}
# Held while a backend loads (re-entrant: loading may load or define other ops).
_LOAD_LOCK = threading.RLock()
# Modules that register backends, imported when the first module is built (load_for).
# Each must import cleanly without its dependencies (the heavy import happens in
# Backend.load).
_MODULES = ("reference", "native", "triton", "emulated")
# "auto" tries these in order: fastest first, the reference last.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


_IMPORTED = False


def registry() -> dict[str, Backend]:
    global _IMPORTED
    if not _IMPORTED:  # (not "if not _REGISTRY": importing one backend module directly registers it first)
        _IMPORTED = True
        for mod in _MODULES:
            try:
                importlib.import_module(f"{__name__}.{mod}")
            except ImportError:
                pass  # module not written yet / optional
    return _REGISTRY


def _check_name(name: str, reg: dict) -> None:
    if name not in reg:
        raise ValueError(f"fusedrnn: unknown backend {name!r}; known backends: {sorted(reg)}, 'auto', "
                         f"or {TORCH_NN!r} (torch.nn's own forward)")


def load_for(name: str) -> None:
    """Import and load the backends that `name` ("auto" or a backend name) may run, now
    (once per process; later calls are dict lookups); an unknown name raises ValueError.
    The modules call this when they are built, so that a first forward traced by
    torch.compile finds them loaded: Dynamo cannot trace the imports and op registrations
    that loading does."""
    if name == TORCH_NN:  # (the modules' backend="torch.nn": nothing of fusedrnn's runs)
        return
    _probe_cpu()
    reg = registry()
    if name != "auto":
        _check_name(name, reg)
        reg[name].unavailable()
        return
    for order in AUTO_ORDER.values():  # as _select would: up to the first usable one
        for cand in order:
            if cand in reg and reg[cand].unavailable() is None:
                break


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends usable on `device` in this process (auto's preference first)."""
    device = torch.device(device)
    names = [n for n in AUTO_ORDER.get(device.type, ()) if n in registry()]
    names += sorted(n for n in registry() if n not in names)
    return [n for n in names if registry()[n].unavailable() is None
            and device.type in registry()[n].device_types]


# select's results: (name, call) -> (backend, why). A backend that accepted a call keeps
# accepting it (availability is decided once per process), so a hit is the same answer,
# without the checks: the cells call select on every step.
_CHOICES: dict[tuple[str, Call], tuple[Backend, str]] = {}


# Where torch.nn's own kernel is faster than every fusedrnn backend, "auto" runs torch.nn's
# forward instead (the module reports last_backend == TORCH_NN). The one case left: LSTM
# inference in float32 on a CPU where torch.nn's LSTM runs oneDNN's AVX-512 kernels, at
# batch 32-64, seq_len >= 32, hidden 256-512 and input_size >= hidden, where both are bound
# by GEMMs at the same rate and ours measured at parity (bench/cpu_ops.py, 2026-11-30,
# T = 32 / 64 / 128, input_size = hidden: 0.96-1.05x; bench/MEASUREMENTS.md, "Where auto
# hands LSTM to torch.nn"). Everything else is ours, as measured in the same runs:
# - training (one layer, input requiring grad): 0.96-1.02x at batch 32 and T <= 64, and
#   1.07-1.47x at batch 64-128 or T = 128 (oneDNN's training slows there); with a frozen
#   input or 2+ layers it was 1.08-1.31x before;
# - hidden 64-128 (inference 0.99-1.30x), input_size below hidden (a first layer fed few
#   features: hidden 512, batch 64, input 16-64: 1.06-1.07x), batch 128 (0.98-1.18x),
#   hidden 1024 (0.90-1.14x over three runs before git 20a9b4b: parity or better).
# Short sequences stay ours too: oneDNN's per-call cost dominates them (B=32 H=256: T=1
# 1.47x inference; T=16 0.95x). From git 20a9b4b to 3671987 auto handed
# torch.nn all of batch >= 32 with hidden <= 512, training included (one layer), from
# runs at T = 32 and input_size = hidden only. On an AVX2-only CPU (Zen 3, earlier
# sessions) the two were at parity at hidden 256-512 (0.96-1.12x), so "auto" keeps
# backend "cpu" on such CPUs. On a CPU that runs 512-bit FMAs at full width (Zen 5), where
# the cpu kernels run 16-float vectors (tiled mode 3, csrc/cpu/kernels.cpp), ours measured
# 0.97-1.11x there (2026-11-30, T 32-128, median 1.04x): "auto" keeps backend "cpu" too.
TORCH_NN = "torch.nn"
TORCH_NN_MIN_BATCH, TORCH_NN_MAX_BATCH = 32, 64
TORCH_NN_MIN_STEPS = 32
TORCH_NN_MIN_HIDDEN, TORCH_NN_MAX_HIDDEN = 256, 512


def onednn_avx512() -> bool:
    """Whether torch's oneDNN kernels run AVX-512 code here (and oneDNN is on). The CPU and
    the build are asked once (_probe_cpu: Dynamo cannot trace those checks); the switch
    torch.backends.mkldnn.enabled on every call."""
    global _AVX512
    if _AVX512 is None:
        _AVX512 = (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                   and torch.backends.mkldnn.is_available())
    return _AVX512 and torch.backends.mkldnn.enabled


_AVX512: Optional[bool] = None
# Whether the cpu kernels run 16-float (zmm) vectors (their tiled mode 3 when the
# extension loaded: backends/native.py sets it).
CPU_ZMM = False


def _onednn_lstm_uncompilable(call: Call) -> bool:
    """Whether handing `call` to torch.nn would run its oneDNN LSTM under torch.compile, which
    failed with grad enabled (torch 2.14, float32 and bfloat16: "expected all
    tensors_saved_with_vc_check to be Tensors" with aot_eager, "expected Tensor() for op
    mkldnn_rnn_layer" with inductor), where fusedrnn's ops compile. torch.nn's GRU, RNN and
    float16 LSTM compiled."""
    return call.cell == "lstm" and torch.compiler.is_compiling()


def torch_nn_faster(call: Call, steps: int, packed: bool, training: bool = False, input_size: int = 0,
                    bf16_kernels: bool = False) -> Optional[str]:
    """Why torch.nn's own kernel is faster than fusedrnn's for this sequence call of `steps`
    timesteps, or None (see TORCH_NN). `packed`: the input is a PackedSequence (torch.nn then
    skips oneDNN). `training`: a module in training mode whose call autograd records;
    `input_size`: the module's; `bf16_kernels`: the float32 call would run on the bfloat16
    kernels (matmul precision "medium", float32_matmul_in_bf16), where oneDNN's float32 LSTM
    does not speed up and ours measured 1.46-2.09x faster."""
    if training or bf16_kernels or _onednn_lstm_uncompilable(call):
        return None
    if not (call.cell == "lstm" and call.device.type == "cpu" and call.dtype == torch.float32
            and call.proj_size == 0 and not packed and steps >= TORCH_NN_MIN_STEPS
            and TORCH_NN_MIN_BATCH <= call.batch <= TORCH_NN_MAX_BATCH
            and TORCH_NN_MIN_HIDDEN <= call.hidden_size <= TORCH_NN_MAX_HIDDEN
            and input_size >= call.hidden_size):
        return None
    if not onednn_avx512() or CPU_ZMM:
        return None
    return (f"auto: torch.nn's LSTM (oneDNN, AVX-512) measured at least as fast as backend 'cpu' for float32 "
            f"inference at batch {TORCH_NN_MIN_BATCH}-{TORCH_NN_MAX_BATCH}, seq_len >= {TORCH_NN_MIN_STEPS}, "
            f"hidden_size {TORCH_NN_MIN_HIDDEN}-{TORCH_NN_MAX_HIDDEN} and input_size >= hidden_size on AVX-512 "
            f"CPUs (backend='cpu' forces ours)")


# "auto" does not run the reference where torch.nn can run the call: the reference is the
# spec (a per-step loop of PyTorch ops), torch.nn's own forward computes the same thing
# faster (bfloat16 LSTM, T=32, B=8, H=256 on the CPU: 1.1 ms against the reference's 5.8).
# It is what "auto" falls to when no fused backend runs a call: a dtype the kernels lack
# (bfloat16, float16 on the CPU), or a pure-Python install. Where torch.nn fails (some
# CPUs lack low-precision kernels for some cells), the module falls back to the reference
# and remembers that (torch_nn_cannot).
_TORCH_NN_CANNOT: set = set()


def torch_nn_instead_of_reference(call: Call, chosen: str, why: str) -> Optional[str]:
    """Why auto's choice `chosen` (with select's reason `why`) gives way to torch.nn's own
    forward, or None."""
    if chosen != "reference" or (call.cell, call.device.type, call.dtype) in _TORCH_NN_CANNOT:
        return None
    return f"{why}; torch.nn's own forward instead of the reference (the spec, a per-step loop)"


# Float16 and bfloat16 on the CPU: backend "cpu" computes them in float32
# (Backend.float32_for: the module casts input, states and weights in and the results
# back), where torch.nn runs its own low-precision CPU kernels. Measured on the Zen 4 VM
# (AVX-512 with AVX512-BF16; no AVX512-FP16, no AMX), 2026-11-30, in-process, interleaved,
# T=32, B 1-64, H 64-1024, against torch.nn in the same dtype:
# - float16: torch.nn has no fast kernels for it here (its float16 LSTM ran at 1/5 of its
#   float32 speed). Sequence modules: ours 1.4-6.8x in inference, 3.5-107x in training
#   (one run put LSTM B=1 H=512 inference at 0.89x; 2.2x when rerun in-process).
#   Cells: at batch >= 8 ours 1.05-4.0x (inference), 2.2-38x (training); at batch 1
#   0.18-0.74x in inference (casting the weights to float32 on every step costs more
#   than torch.nn's step), so torch.nn there.
# - bfloat16: torch.nn's LSTM runs oneDNN's bfloat16 kernels (AVX512-BF16 dot products at
#   twice the float32 FMA rate): ours 0.50-0.77x in inference; in training 1.3-6.4x at
#   batch <= 4, 1.13-2.1x at hidden >= 768 up to batch 16 (torch.nn's bfloat16 LSTM
#   training slows down there), 0.59-0.96x elsewhere (B=8 H=512 0.77x, then 1.14x: noise
#   at that edge; B=32 H=1024 0.93x). GRU and RNN are
#   torch.nn's per-step bfloat16 ops: in inference ours 1.02-4.5x where a step's recurrent
#   multiply-adds, batch x hidden^2 x gates, are <= 2^22, 0.58-1.06x above; in training
#   1.03-8.3x at batch <= 8 and at batch x hidden <= 8192 (B=32 H=256: 1.19-1.48x), 0.58-1.18x
#   above (bench/cpu_ops.py --dtype bfloat16, and a second grid at B 1-64, H 64-1024). The
#   bfloat16 cells: 0.32-1.53x, mostly below 1: torch.nn.
# - bfloat16 inference on the bfloat16 kernels (Backend.bf16_recurrence: AVX512-BF16, 8+
#   steps; the input projection and the recurrent products on bfloat16 dot products, the
#   cell math in float32), the same grid at T=32 (bench/cpu_ops.py --dtype bfloat16 --modes
#   inference, two runs): LSTM 1.07-1.34x at batch 1, 0.96-1.09x at batch 8 (1.03-1.06x
#   at hidden 1024), 0.88-1.00x at batch 32-64, where both run at the dot products' rate;
#   GRU 1.07-4.6x and RNN 1.13-4.3x everywhere. They replace the float32 compute there.
#   Training on them (the forward, the recurrence's backward GEMM, dW_hh and the input
#   projection's gradients on bfloat16 dot products, the cell math in float32; --modes
#   training --reps 5): LSTM 1.09-9.3x but 0.99x at B=64 H=256 (torch.nn there); GRU
#   1.24-5.6x and RNN 1.12-4.6x everywhere.
# - On the Zen 5 VM (2026-11-30; the bfloat16 kernels on zmm vectors, CPU_ZMM) these rules
#   held but for LSTM inference at batch 8: 0.84-0.87x at hidden 1024 in three runs, then,
#   once B=8 ran by units on 8-row blocks (git 2a84166), 1.05-1.12x at hidden 256-1024 in
#   three runs (ours at batch <= 8 there); on 2026-12-01 (sixth session) 0.92-0.99x at
#   batch 8, hidden 256-1024, in three runs (1.07-1.10x at batch 4, 0.93-1.06x at 16):
#   torch.nn's at batch 8 again. GRU inference measured 0.73-0.93x at batch
#   32-64, hidden 512-1024 while its 3-vector panels ran a zmm and an 8-float vector per
#   row (3/4 of the zmm rate; git 0cfda9f gave torch.nn that region); with the panels in
#   pairs, 3 zmm per row (TiledF::pairs), 1.45-2.0x there, 1.45-5.2x over the grid: ours
#   again. RNN inference 1.16-2.7x at B 32-64.
# CPUs whose oneDNN has native low-precision matrix units (AMX; AVX512-FP16 for float16)
# were not measured; auto keeps torch.nn there. A forced backend="cpu" always runs ours.
# - CPUs without AVX-512 (oneDNN then has no bfloat16 kernels: Zen 3, AVX2; measured
#   2026-12-01, bench/cpu_ops.py and bench/cells.py --dtype bfloat16 / float16): torch.nn's
#   low-precision RNNs run emulated, so the rules above, measured where oneDNN's AVX-512
#   kernels run, do not hold there (they handed bfloat16 LSTM inference and large GRU / RNN
#   calls to torch.nn). Sequence modules at T=32, B 1-64, H 256-512: ours 2.05-8.9x in
#   inference and 8-66x in training (bfloat16), 1.8-7.4x and 13-62x (float16).
#   Cells: in training ours 1.06-10.7x where a step's multiply-adds (batch x hidden^2 x
#   gates) are >= 2^16, 0.74-1.22x below; in inference torch.nn's up to batch 4 (ours
#   0.11-0.77x, but for 1.1-1.3x at B=4 H=256), ours 1.13-1.94x from batch 8 at >= 2^18
#   multiply-adds (RNNCell B=8 H=256 0.99-1.20x), 0.47-1.15x below. One rule for both dtypes
#   (_emulated_low_precision_rule).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _onednn_avx512_low_precision() -> bool:
    """Whether torch's oneDNN has its (AVX-512) bfloat16 kernels on this CPU, where the
    measured rules of LOW_PRECISION hold (asked once, by _probe_cpu); without them torch.nn's
    low-precision RNNs run emulated."""
    if _ONEDNN_BF16 is None:
        _probe_cpu()
    return _ONEDNN_BF16


_ONEDNN_BF16: Optional[bool] = None


def _emulated_low_precision_rule(call: Call, grad: bool, sequence: bool) -> bool:
    """Whether ours runs a low-precision call on a CPU where torch.nn's low-precision RNNs
    run emulated (see LOW_PRECISION)."""
    work = call.batch * call.hidden_size ** 2 * GATES[call.cell]
    return sequence or (work >= 2 ** 16 if grad else call.batch >= 8 and work >= 2 ** 18)


def _native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix units for `dtype` that torch.nn's oneDNN kernels use
    and fusedrnn's float32 compute was not measured against (asked once, by _probe_cpu)."""
    if dtype not in _NATIVE:
        _probe_cpu()
    return _NATIVE[dtype]


_NATIVE: dict = {}


def _probe_cpu() -> None:
    """Answer auto's questions about this CPU once, when the first module is built
    (load_for): torch.compile's Dynamo refuses to trace torch.cpu's feature checks, so a
    compiled first forward must find them answered."""
    global _ONEDNN_BF16
    if _NATIVE:
        return
    onednn_avx512()
    cpu = torch.cpu
    try:
        _NATIVE[torch.bfloat16] = bool(cpu._is_amx_tile_supported())
        _NATIVE[torch.float16] = bool(cpu._is_amx_fp16_supported() or torch.ops.mkldnn._is_mkldnn_fp16_supported())
        _ONEDNN_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # (private helpers of torch 2.14: absent elsewhere)
        _NATIVE[torch.bfloat16] = _NATIVE[torch.float16] = True
        _ONEDNN_BF16 = True


def torch_nn_faster_low_precision(call: Call, backend: Backend, grad: bool, sequence: bool,
                                  bf16_kernels: bool = False) -> Optional[str]:
    """Why auto runs torch.nn's own forward for a float16 / bfloat16 call that `backend`
    would compute in float32, or None (see LOW_PRECISION). `grad`: autograd records the
    call (a backward will run); `sequence`: a sequence module, not a cell; `bf16_kernels`:
    the call would run on the backend's bfloat16 dot products (Backend.bf16_recurrence)."""
    if (call.dtype not in backend.float32_for or (call.cell, call.device.type, call.dtype) in _TORCH_NN_CANNOT
            or (sequence and _onednn_lstm_uncompilable(call))):
        return None
    name = str(call.dtype).replace("torch.", "")
    if _native_low_precision(call.dtype):
        return (f"auto: this CPU has native {name} matrix units, whose oneDNN kernels torch.nn runs "
                f"(backend 'cpu''s float32 compute was not measured against them; backend='cpu' forces it)")
    work = call.batch * call.hidden_size ** 2 * GATES[call.cell]
    if not _onednn_avx512_low_precision():
        ours = _emulated_low_precision_rule(call, grad, sequence)
    elif call.dtype == torch.float16:
        ours = sequence or call.batch >= 8
    elif not sequence:
        ours = False
    elif call.cell == "lstm" and grad and bf16_kernels:
        ours = call.batch * call.hidden_size < 16384 or call.hidden_size >= 512
    elif call.cell == "lstm" and grad:
        ours = call.batch <= 4 or (call.hidden_size >= 768 and call.batch <= 16)
    elif call.cell == "lstm":  # (batch 8: on Zen 4 from hidden 1024; not on Zen 5's zmm kernels)
        ours = bf16_kernels and (call.batch <= 4 or (call.batch <= 8 and not CPU_ZMM and call.hidden_size >= 1024))
    elif grad:
        ours = bf16_kernels or call.batch <= 8 or call.batch * call.hidden_size <= 8192
    else:
        ours = bf16_kernels or work <= 2 ** 22
    if ours:
        return None
    compute = "bfloat16 dot products" if bf16_kernels else "float32 compute"
    return (f"auto: torch.nn's {name} CPU kernels measured faster here than backend 'cpu''s {compute} "
            f"({'training' if grad else 'inference'}, batch {call.batch}, hidden {call.hidden_size}; "
            "backend='cpu' forces ours)")


def float32_matmul_in_bf16() -> bool:
    """Whether the user let float32 matmuls on the CPU use bfloat16 products:
    torch.set_float32_matmul_precision("medium"), or torch.backends.mkldnn.matmul.fp32_precision
    = "bf16", which torch's own CPU matmuls then follow. The cpu backend's float32 sequences
    then run on its bfloat16 kernels too (Backend.bf16_recurrence). Not while torch.compile
    or torch.export traces (Dynamo cannot read the setting): exact float32 there."""
    if torch.compiler.is_compiling():
        return False
    try:  # (the property torch.backends.mkldnn.matmul.fp32_precision reads this: 0.9 us, the getter 0.1 us)
        return torch._C._get_fp32_precision_getter("mkldnn", "matmul") == "bf16"
    except (AttributeError, RuntimeError):  # (torch versions without the per-backend setting)
        return False


def torch_nn_for_device(call: Call) -> Optional[str]:
    """Why auto runs torch.nn's own forward for `call`'s device, or None: no fusedrnn backend
    runs on it (e.g. meta tensors for shape inference, mps, xpu), while torch.nn's RNNs do."""
    if call.device.type in AUTO_ORDER:
        return None
    return (f"auto: no fusedrnn backend runs on {call.device.type} tensors (only on "
            f"{' and '.join(AUTO_ORDER)}): torch.nn's own forward")


def torch_nn_cannot(call: Call) -> None:
    _TORCH_NN_CANNOT.add((call.cell, call.device.type, call.dtype))


def select(name: str, call: Call) -> tuple[Backend, str]:
    """Resolve `name` ("auto" or a backend name) for `call`: (backend, why it was chosen)."""
    hit = _CHOICES.get((name, call))
    if hit is None:
        if len(_CHOICES) >= 4096:  # (e.g. a server seeing every batch size): start over
            _CHOICES.clear()
        from .. import verify  # (not at import: `python -m fusedrnn.verify` would find it imported)
        deferred = verify.deferred(call)
        hit = _select(name, call, deferred)
        if not deferred:  # (a choice made without the device check is made again next time)
            _CHOICES[(name, call)] = hit
    return hit


def _select(name: str, call: Call, deferred: bool = False) -> tuple[Backend, str]:
    """select without its cache. `deferred`: no kernel can run now (verify.deferred), so
    the backends' device checks wait for a later call."""
    from .. import verify
    reg = registry()
    if name != "auto":
        _check_name(name, reg)
        why = reg[name].refuses(call)
        if why:
            raise RuntimeError(f"fusedrnn: backend {name!r} cannot run this {call.cell.upper()} call "
                               f"({call.device.type}, {str(call.dtype).replace('torch.', '')}): {why}")
        off = None if deferred else verify.on_device(reg[name], call)  # (warns: it runs all the same)
        return reg[name], "forced by backend=" + repr(name) + (f" (it {off})" if off else "")
    skipped = []
    for cand in AUTO_ORDER.get(call.device.type, ("reference",)):
        if cand not in reg:
            skipped.append(f"{cand}: not built")
            continue
        why = reg[cand].refuses(call) or (None if deferred else verify.on_device(reg[cand], call))
        if why is None:
            reason = f"auto: first usable of {list(AUTO_ORDER.get(call.device.type, ()))}"
            return reg[cand], reason + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{cand}: {why}")
    raise RuntimeError(f"fusedrnn: no backend can run this call: {'; '.join(skipped)}")

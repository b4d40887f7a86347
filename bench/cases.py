"""Benchmark cases: one shape/mode point, the presets' grids, and the FLOP model.

A preset is a list of grids; a grid is the cartesian product of its fields'
values. `--cells`, `--batch`, ... on the command line replace a field in every
grid of the chosen preset.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from fusedrnn.contract import GATES

CELLS = ("lstm", "gru", "rnn")
MODES = ("inference", "training")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    cell: str            # "lstm" | "gru" | "rnn"
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    layers: int
    bidirectional: bool
    dtype: str           # canonical name: "float32", "bfloat16", ...
    mode: str            # "inference" (forward under no_grad) | "training" (forward + backward)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def label(self) -> str:
        s = (f"{self.cell.upper()} B={self.batch} T={self.seq_len} I={self.input_size} H={self.hidden_size}"
             f" L={self.layers}{' bi' if self.bidirectional else ''} {self.dtype} {self.mode}")
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    def flops(self) -> float:
        """Matrix-multiply FLOPs of one call (the FLOP model; pointwise gate math is not counted).

        Per time step, per direction, per layer (G = 4H / 3H / H for LSTM / GRU / RNN,
        P = H since no projection is benchmarked, I_l = input size of layer l, which is
        input_size for layer 0 and directions*H above):
            recurrent  2*B*G*P
            input      2*B*G*I_l
        (an LSTM projection would add 2*B*P*H). Training (forward + backward) counts 3x the
        forward: the backward has two matmuls per forward matmul (input/state grads and
        weight grads).
        """
        G = GATES[self.cell] * self.hidden_size
        P = self.hidden_size
        total = 0.0
        for layer in range(self.layers):
            i_l = self.input_size if layer == 0 else self.directions * P
            per_step = 2 * self.batch * G * P + 2 * self.batch * G * i_l
            total += per_step * self.seq_len * self.directions
        return total * (3 if self.mode == "training" else 1)


@dataclass(frozen=True)
class Grid:
    cells: tuple = CELLS
    batch: tuple = (32,)
    seq_len: tuple = (64,)
    input_size: tuple = (0,)       # 0: same as the hidden size
    hidden: tuple = (256,)
    layers: tuple = (1,)
    bidirectional: tuple = (False,)
    dtypes: tuple = ("float32",)
    modes: tuple = MODES
    max_tokens: int = 0            # skip points with batch*seq_len above this (0: no limit)

    def cases(self):
        for cell, b, t, i, h, l, bi, dt, mode in itertools.product(
                self.cells, self.batch, self.seq_len, self.input_size, self.hidden, self.layers,
                self.bidirectional, self.dtypes, self.modes):
            if self.max_tokens and b * t > self.max_tokens:
                continue
            yield Case(cell, b, t, i or h, h, l, bool(bi), canonical_dtype(dt), mode)


@dataclass(frozen=True)
class Preset:
    name: str
    grids: tuple
    about: str
    extra_backends: tuple = ()     # besides the contenders (e.g. the reference, for smoke runs)
    budget_s: float = 1.0          # timed seconds per case, split over implementations
    min_runs: int = 5
    max_runs: int = 50
    warmup: int = 2


PRESETS = {
    # The README's command: must finish in under 3 minutes on a 2-core CPU (measured: see the
    # closing note of issue 6). Sequence length 64, input size = hidden size, 1 layer, fp32.
    "default": Preset(
        "default",
        (Grid(batch=(1, 8, 32), seq_len=(64,), hidden=(256, 512, 1024)),),
        "LSTM/GRU/RNN, batch 1/8/32, T=64, hidden 256/512/1024 (input = hidden), 1 layer, fp32, "
        "inference and training",
        budget_s=0.8, min_runs=3, max_runs=25, warmup=1),
    # Smoke test (CI): tiny shapes, also a 2-layer bidirectional point; the reference backend
    # runs too, so every backend's wiring is exercised. Timings mean nothing at this size.
    "quick": Preset(
        "quick",
        (Grid(batch=(2,), seq_len=(6,), input_size=(8,), hidden=(16, 32)),
         Grid(cells=("lstm",), batch=(3,), seq_len=(5,), input_size=(8,), hidden=(16,), layers=(2,),
              bidirectional=(True,))),
        "tiny shapes for smoke runs (timings meaningless)",
        extra_backends=("reference",), budget_s=0.05, min_runs=3, max_runs=3, warmup=1),
    # For a GPU: batch 1-256, hidden 256-2048, T up to 4096, fp32/bf16/fp16. Points with more
    # than 256*1024 tokens are skipped (training activations of B=256,T=4096,H=2048 fp32 LSTM
    # alone would be ~34 GB).
    "gpu": Preset(
        "gpu",
        (Grid(batch=(1, 16, 64, 256), seq_len=(256, 1024, 4096), hidden=(256, 512, 1024, 2048),
              dtypes=("float32", "bfloat16", "float16"), max_tokens=256 * 1024),),
        "LSTM/GRU/RNN, batch 1/16/64/256, T 256/1024/4096 (at most 262144 tokens), hidden 256-2048, "
        "fp32/bf16/fp16, inference and training",
        budget_s=0.5, min_runs=5, max_runs=50, warmup=2),
}


def canonical_dtype(name: str) -> str:
    name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPES)}")
    return str(DTYPES[name]).replace("torch.", "")


def override(grids, **fields) -> tuple:
    """Replace grid fields given on the command line (None: keep the preset's)."""
    given = {k: tuple(v) for k, v in fields.items() if v is not None}
    return tuple(Grid(**{**g.__dict__, **given}) for g in grids)


def expand(grids) -> list[Case]:
    seen, out = set(), []
    for g in grids:
        for c in g.cases():
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out

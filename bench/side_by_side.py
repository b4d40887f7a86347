"""The command line shared by the side-by-side scripts (bench/cells.py, bench/packed.py,
bench/double_backward.py): a grid of HIDDENxBATCH shapes, each timed against torch.nn in
interleaved rounds of blocks of calls (bench/timing.py interleaved_blocks)."""
from __future__ import annotations

import argparse

import torch


def parser(doc: str, *, cells: str, shapes: str, block_ms: float, devices: bool = True) -> argparse.ArgumentParser:
    """The arguments every such script takes; a script adds its own (--seq, --modes, ...).
    `devices`: --device and --backend (the cells script runs on the CPU only)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=cells)
    p.add_argument("--shapes", default=shapes, help="HIDDENxBATCH,...")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-ms", type=float, default=block_ms, help="time per block of calls of one implementation")
    if devices:
        p.add_argument("--device", default="cpu")
        p.add_argument("--backend", default=None, help='fusedrnn backend (default: "cpu" on the CPU, else "auto")')
    return p


def shapes(spec: str) -> list[tuple[int, int]]:
    """"256x8,512x32" -> [(256, 8), (512, 32)] (hidden, batch)."""
    return [tuple(int(v) for v in s.lower().split("x")) for s in spec.split(",")]


def device_and_backend(args) -> tuple[torch.device, str]:
    """--device, and --backend or its default: "cpu" on the CPU, "auto" elsewhere."""
    device = torch.device(args.device)
    return device, args.backend or ("cpu" if device.type == "cpu" else "auto")

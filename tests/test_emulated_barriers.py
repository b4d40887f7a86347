"""Mutation test of the kernels' barriers: switching off any one __syncthreads of the CUDA
kernel sources (the emulator can make a call site a no-op) must make the op tests fail.
This checks both that each barrier is needed and that the emulator + tests catch a
missing one (deterministically: the emulator's schedules are seeded)."""
import pytest
import torch

from op_harness import check_against_reference, make_inputs
from fusedrnn.backends import registry

pytestmark = pytest.mark.emulated

E = pytest.importorskip("fusedrnn._emulated", reason="fusedrnn._emulated is not built")

# K > KC (32) so the end-of-chunk barriers matter too; several blocks in both grid dims.
CASES = {"rnn": dict(T=4, B=6, H=40), "lstm": dict(T=4, B=6, H=40), "gru": dict(T=4, B=6, H=40)}


def _run(cell):
    c = CASES[cell]
    check_against_reference("emulated", cell, make_inputs(cell, c["T"], c["B"], c["H"], lengths=True))


def _kernel_sites():
    if registry()["emulated"].unavailable():
        pytest.skip(registry()["emulated"].unavailable())
    for cell in CASES:  # executes every barrier of the forward and backward kernels
        _run(cell)
    # (the persistent kernels' barriers have their own mutation test: test_emulated_persistent.py)
    sites = [s for s in E.barrier_sites() if "/cuda/kernels/" in s and "/persistent.cuh:" not in s]
    assert len(sites) >= 4, sites
    return sites


def test_every_kernel_barrier_is_caught_when_removed():
    sites = _kernel_sites()
    survived = []
    try:
        for site in sites:
            E.set_drop_barrier(site)
            caught = 0
            for cell in CASES:
                try:
                    _run(cell)
                except (AssertionError, RuntimeError):
                    caught += 1
            if caught < len(CASES):  # each site is used by every cell's kernels
                survived.append(site)
    finally:
        E.set_drop_barrier("")
    assert not survived, f"removing these barriers went unnoticed by some cell: {survived}"
    for cell in CASES:  # and with every barrier back, all pass again
        _run(cell)

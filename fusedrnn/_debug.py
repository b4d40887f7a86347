"""Debug aids shared by backends."""
import os

import torch


def poison_enabled() -> bool:
    """FUSEDRNN_POISON=1 (the tests set it): outputs are NaN-filled before a kernel writes them."""
    return os.environ.get("FUSEDRNN_POISON") == "1"


def new_output(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, NaN-poisoned under FUSEDRNN_POISON=1 (for outputs a kernel must fully write)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan"))
    return out

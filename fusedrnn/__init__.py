"""fusedrnn: fused LSTM/GRU/RNN recurrences behind drop-in torch.nn modules."""
from .backends import available_backends

__all__ = ["available_backends"]

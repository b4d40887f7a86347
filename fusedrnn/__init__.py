"""fusedrnn: fused LSTM/GRU/RNN recurrences behind drop-in torch.nn modules.

    import fusedrnn
    lstm = fusedrnn.LSTM(256, 512, num_layers=2, batch_first=True)   # like torch.nn.LSTM
    model = fusedrnn.convert(model)                                   # swap into an existing model
    model = fusedrnn.revert(model)                                    # and back to torch.nn's
    lstm.last_backend, lstm.last_backend_reason                       # what ran, and why
"""
from .backends import available_backends
from .cells import GRUCell, LSTMCell, RNNCell
from .convert import convert, revert
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "revert", "available_backends"]
__version__ = "0.1.0"

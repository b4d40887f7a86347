"""Drop-in fusedrnn.LSTM / GRU / RNN.

Each class subclasses its torch.nn counterpart, so the constructor, its
validation, the parameters (names, shapes, order, initialisation), state_dict,
repr and isinstance checks are torch.nn's own. Only forward differs: per layer
and direction, the input projection is one GEMM over all time steps and the
recurrence is one fused op of the chosen backend (DESIGN.md, "Data flow").
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.utils.rnn import PackedSequence

from . import autocast as AC
from . import packed
from . import validation as V
from .bidirectional import at_once as pair_at_once, forward_pair
from .backends import (TORCH_NN, Call, float32_matmul_in_bf16, load_for, select, torch_nn_cannot, torch_nn_faster,
                       torch_nn_faster_low_precision, torch_nn_for_device, torch_nn_instead_of_reference)
from .ops import records_grad
from .projection import input_projection
from .transforms import differentiating_transform, onnx_export, refuse


class BackendChoice:
    """The `backend=` keyword of every fusedrnn module, and what ran last."""

    def _init_backend(self, backend: str) -> None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string ('auto' or a backend name), got {type(backend).__name__}")
        load_for(backend)
        self.backend = backend
        self.last_backend: str | None = None         # which backend ran the last forward
        self.last_backend_reason: str | None = None  # and why it was chosen

    def __getstate__(self):
        # (pickle, torch.save, deepcopy) The fast step's cache holds the backend and its ops,
        # which do not pickle: left out, the next call builds it again.
        state = super().__getstate__()
        state.pop("_fused_fast", None)
        return state

    def _cached_fast_step(self, input, hx):
        """_fast_step's result where the last call left a step to repeat (`_fused_fast`, set by
        the forward), else None (then the forward goes the long way)."""
        fast = self.__dict__.get("_fused_fast")
        return None if fast is None else self._fast_step(fast, input, hx)

    def _record_choice(self, name: str, why: str) -> None:
        # Plain attributes, set on every forward: skip nn.Module.__setattr__'s parameter checks.
        self.__dict__["last_backend"], self.__dict__["last_backend_reason"] = name, why

    def _torch_nn_forward(self, why: str, chosen, call, input, hx):
        """torch.nn's own forward (these modules are torch.nn modules), recorded as backend
        TORCH_NN with reason `why`; None if torch.nn cannot run it where auto had chosen the
        reference or a float32 compute of a low-precision call (then that runs, and later calls
        skip torch.nn). `chosen`: auto's fusedrnn backend for the call, None if there is none."""
        try:
            out = super(BackendChoice, self).forward(input, hx)
        except RuntimeError:
            if chosen is None or (chosen.name != "reference" and call.dtype not in chosen.float32_for):
                raise
            torch_nn_cannot(call)
            return None
        self._record_choice(TORCH_NN, why)
        return out

    def _fx_leaf(self, input, hx):
        """Under torch.fx symbolic tracing (a Proxy input), this module's call as one
        call_module node, as torch.nn's RNNs are leaves of FX's default tracer (it traces into
        other modules, and this forward cannot be traced: it branches on its input).
        The GraphModule then calls this module, fused kernels included. (Called for a Proxy
        input only.)"""
        tracer = input.tracer
        if getattr(tracer, "root", None) is self:  # torch.nn's RNNs cannot be traced as the root either
            raise torch.fx.proxy.TraceError(
                f"fusedrnn.{type(self).__name__} cannot be the root of torch.fx.symbolic_trace (as "
                f"torch.nn's {type(self).__name__} cannot): trace a module that holds it, where it is a leaf")
        return tracer.create_proxy("call_module", tracer.path_of_module(self),
                                   (input,) if hx is None else (input, hx), {})

    def _forward_without_fused_ops(self, input, hx):
        """torch.nn's forward where fusedrnn's ops must not or cannot run: backend="torch.nn"
        (e.g. for a double backward outside the cpu backend), or, with backend "auto",
        where torch.func's grad-type transforms or forward-mode AD differentiate the call or
        torch.onnx.export captures it (fusedrnn/transforms.py: the ops cannot take part);
        another forced backend raises there. None otherwise."""
        if self.backend == TORCH_NN:
            return self._torch_nn_forward("forced by backend='torch.nn'", None, None, input, hx)
        transform = onnx_export() or differentiating_transform(lambda: self._call_tensors(input, hx))
        if transform is None:
            return None
        if self.backend != "auto":
            raise refuse(self.backend, transform)
        return self._torch_nn_forward(f"auto: under {transform}, which fusedrnn's ops cannot take part in: "
                                      "torch.nn's own forward", None, None, input, hx)

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in place of this module: torch.nn's twin
        (convert.torch_nn_twin: same arguments, the same Parameter objects, training mode
        and hooks). This forward is Python that TorchScript cannot compile (the backend
        choice); torch.nn's forward is TorchScript, so a scripted model runs torch.nn's
        kernels. PyTorch's protocol puts the twin in place of this module among a parent's
        submodules too: a scripted model's eager original then runs torch.nn (convert it
        again to swap back). A forced fusedrnn backend raises, as under the transforms above."""
        if self.backend not in ("auto", TORCH_NN):
            raise refuse(self.backend, "torch.jit.script")
        from .convert import torch_nn_twin  # convert imports this module
        return torch_nn_twin(self)

    def _device_forward(self, call, input, hx):
        """torch.nn's forward where `call`'s device has no fusedrnn backend
        (torch_nn_for_device; auto only: a forced backend refuses in select); else None."""
        why = torch_nn_for_device(call) if self.backend == "auto" else None
        return self._torch_nn_forward(why, None, call, input, hx) if why else None

    def _call_tensors(self, input, hx):
        """The tensors of a call: input, initial states, weights."""
        hs = [] if hx is None else list(hx) if isinstance(hx, (tuple, list)) else [hx]
        data = input.data if isinstance(input, PackedSequence) else input
        return [data, *hs, *self._weight_tensors()]

    def _cell_op_step(self, op, x, hs, w_ih, w_hh, b_ih, b_hh):
        """One step as one call of the backend's cell op (fusedrnn/cell_ops.py): x [B, I],
        hs the states [B, H]; returns the new states ([h1, c1] or [h1])."""
        if self._cell == "lstm":
            train = records_grad(x, hs[0], hs[1], w_ih, w_hh, b_ih, b_hh)
            return list(op(x, hs[0], hs[1], w_ih, w_hh, b_ih, b_hh, train)[:2])
        if self._cell == "gru":
            return [op(x, hs[0], w_ih, w_hh, b_ih, b_hh, records_grad(x, hs[0], w_ih, w_hh, b_ih, b_hh))[0]]
        return [op(x, hs[0], w_ih, w_hh, b_ih, b_hh, self.nonlinearity == "relu")]

    def _param(self, name):
        """The weight `name` (None for None): the parameter, or, when it is not a plain
        parameter (e.g. torch.nn.utils.parametrize), the module attribute."""
        if name is None:
            return None
        p = self._parameters.get(name)
        return p if p is not None else getattr(self, name)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"


def below_autograd_if_no_grad():
    """Under no_grad / inference, dispatch straight to the kernels: skips the autograd
    wrapper of each custom op (~5 us per call, a third of a small op's time). Not while
    torch.compile traces: it has no Python overhead to save and cannot trace this."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def fast_step_applies(module, setting: str, dtype: torch.dtype, device: torch.device, input, dim: int) -> bool:
    """Whether a call of `module` may take its _fast_step (the cells' and the sequence
    modules'): eager inference on a plain `dim`-D tensor of the dtype and device and under the
    backend setting its cached step ran with (another dtype may be cast or run by torch.nn,
    another device, e.g. meta, run by torch.nn: the long way decides); not under autograd,
    autocast, tracing or compiling, torch.func or forward-mode AD (the long way decides those
    too)."""
    return not (torch.is_grad_enabled() or type(input) is not Tensor or module.backend != setting
                or torch._C._is_any_autocast_enabled() or torch._C._get_tracing_state() is not None
                or torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or fwAD._current_level >= 0 or input.dim() != dim or input.dtype != dtype
                or input.device != device)


def fast_step_states(hx, like: Tensor, shape: tuple, lstm: bool):
    """A fast step's initial states ([h] or [h, c]): zeros of `shape` for hx None, else hx's
    tensors if each has exactly `shape` and `like`'s dtype and device; None otherwise (the
    long way then checks and raises)."""
    if hx is None:
        return [like.new_zeros(shape) for _ in range(2 if lstm else 1)]
    hs = list(hx) if lstm and type(hx) is tuple and len(hx) == 2 else [hx] if not lstm else []
    dtype, device = like.dtype, like.device
    if not hs or any(type(h) is not Tensor or h.shape != shape or h.dtype != dtype or h.device != device for h in hs):
        return None
    return hs


def _layer_records_grad(layer_in, weights, states) -> bool:
    """records_grad of a layer's input, weights and states (the tensors gathered only where
    grad mode or tracing could make it true)."""
    if not (torch.is_grad_enabled() or torch.jit.is_tracing()):
        return False
    return records_grad(layer_in, *(t for w in weights for t in w), *(t for s in states for t in s))


def _cast_back(finish, dtype):
    """finish(y, states) with y and the states cast to `dtype` first (float32_for)."""
    return lambda y, states: finish(y.to(dtype), [h.to(dtype) for h in states])


class _FusedRNNBase(BackendChoice):
    """Shared forward of the three sequence modules; `_cell` is "lstm", "gru" or "rnn"."""

    _cell: str
    _torch_name: str

    # ------------------------------------------------------------------ input handling
    def _prepare(self, input, hx):
        """Validate like torch.nn and bring everything to time-major [T, B, *] form.

        Returns (x, lengths, rows, hs, finish) where hs is the list of initial states
        ([h0] or [h0, c0], each [L*D, B, *]), finish(y, states) builds the module's
        return value and rows (a PackedSequence's sequences of unequal lengths, else None)
        are the padded rows t * B + b that hold data (packed.pad).
        """
        V.check_bidirectional(self._torch_name, self.bidirectional)
        lstm = self._cell == "lstm"
        D = 2 if self.bidirectional else 1
        P = self.proj_size if lstm and self.proj_size > 0 else self.hidden_size
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            V.require_tensor(data, self._torch_name, "input")
            V.check_input_dtype(self, data)
            self.check_input(data, batch_sizes)
            # Padded in the packed order (fusedrnn/packed.py). The states are permuted into
            # that order and back, as torch.nn permutes them.
            x, lengths, rows = packed.pad(data, batch_sizes)
            B = x.shape[1]
            hs = self._initial_states(hx, x, B, D, P, lstm)
            self.check_forward_args(data, tuple(hs) if lstm else hs[0], batch_sizes)
            V.check_hidden_like_input(data, hs, self._hidden_names())
            if hx is not None and sorted_idx is not None:
                hs = [h.index_select(1, sorted_idx) for h in hs]

            def finish(y, states):
                y = y.reshape(-1, y.shape[-1])
                out = PackedSequence(y if rows is None else y.index_select(0, rows), batch_sizes, sorted_idx,
                                     unsorted_idx)
                if unsorted_idx is not None:
                    states = [s.index_select(1, unsorted_idx) for s in states]
                return out, (tuple(states) if lstm else states[0])

            return x, None if lengths is None else lengths.to(x.device), rows, hs, finish

        V.require_tensor(input, self._torch_name, "input")
        V.check_input_dim(self._torch_name, input)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        if self.batch_first:
            x = x.transpose(0, 1)
        B = x.shape[1]
        if hx is not None:
            given = list(V.lstm_hidden_pair(hx)) if lstm else [hx]
            if not lstm:
                V.require_tensor(hx, self._torch_name, "hx")
            V.check_hidden_dims(batched, given, lstm)
            if not batched:
                given = [h.unsqueeze(1) for h in given]
            hx = tuple(given) if lstm else given[0]
        V.check_input_dtype(self, x)
        hs = self._initial_states(hx, x, B, D, P, lstm)
        # check_forward_args reads the batch from input in the module's own layout.
        self.check_forward_args(x.transpose(0, 1) if self.batch_first else x,
                                tuple(hs) if lstm else hs[0], None)
        V.check_hidden_like_input(x, hs, self._hidden_names())
        V.check_sequence_length(x.shape[0])

        def finish(y, states):
            if self.batch_first:
                y = y.transpose(0, 1)
            if not batched:
                y = y.squeeze(0 if self.batch_first else 1)
                states = [s.squeeze(1) for s in states]
            return y, (tuple(states) if lstm else states[0])

        return x, None, None, hs, finish

    def _initial_states(self, hx, x, B, D, P, lstm):
        if hx is None:
            shape = (self.num_layers * D, B)
            zeros = [x.new_zeros(*shape, P)]
            if lstm:
                zeros.append(x.new_zeros(*shape, self.hidden_size))
            return zeros
        if not lstm:
            V.require_tensor(hx, self._torch_name, "hx")
        return list(V.lstm_hidden_pair(hx)) if lstm else [hx]

    def _hidden_names(self):
        return ["hx[0]", "hx[1]"] if self._cell == "lstm" else ["hx"]

    # ------------------------------------------------------------------ the layers
    def _weight_names(self) -> list[tuple]:
        """Per (layer, direction): parameter names of (w_ih, w_hh, b_ih, b_hh, w_hr), None if absent.

        Computed once: the names depend only on constructor arguments.
        """
        names = self.__dict__.get("_fused_weight_names")
        if names is None:
            names = []
            proj = self._cell == "lstm" and self.proj_size > 0
            for layer in range(self.num_layers):
                for d in range(2 if self.bidirectional else 1):
                    sfx = f"_l{layer}" + ("_reverse" if d else "")
                    names.append(("weight_ih" + sfx, "weight_hh" + sfx,
                                  "bias_ih" + sfx if self.bias else None,
                                  "bias_hh" + sfx if self.bias else None,
                                  "weight_hr" + sfx if proj else None))
            self.__dict__["_fused_weight_names"] = names
        return names

    def _weight_tensors(self):
        return [self._param(n) for names in self._weight_names() for n in names if n is not None]

    def forward(self, input, hx=None):
        # torch.nn's forward first re-syncs _flat_weights (its cuDNN buffer); this forward
        # reads the parameters by name, so it has nothing to re-sync.
        out = self._cached_fast_step(input, hx)
        if out is not None:
            return out
        # (a Proxy has no truth value: no `or`)
        out = self._fx_leaf(input, hx) if isinstance(input, Proxy) else self._forward_without_fused_ops(input, hx)
        if out is not None:
            return out
        x, lengths, rows, hs, finish = self._prepare(input, hx)
        names = self._weight_names()
        V.check_device(self._param(names[0][1]), x)
        cast = AC.run_dtype(self._torch_name, x)
        if cast is not None:
            x, hs = x.to(cast), [h.to(cast) for h in hs]
        call = Call(cell=self._cell, device=x.device, dtype=x.dtype, hidden_size=self.hidden_size,
                    proj_size=getattr(self, "proj_size", 0), batch=x.shape[1])
        out = self._device_forward(call, input, hx)
        if out is not None:
            return out
        backend, why = select(self.backend, call)
        # bfloat16 on a backend with bfloat16 recurrence kernels: x, the weights and the input
        # projection stay bfloat16, the states and the cell math float32 (_sequence_layer);
        # other low-precision calls compute in float32 (float32_for).
        # float32 too where the user allowed bfloat16 products for float32 matmuls
        # (float32_matmul_in_bf16: torch.set_float32_matmul_precision("medium")).
        bf16 = (backend.bf16_recurrence is not None and backend.bf16_recurrence(x.shape[0]) and (
                    call.dtype == torch.bfloat16 or (call.dtype == torch.float32 and float32_matmul_in_bf16())))
        if self.backend == "auto":
            w = self._param(names[0][0])
            # (torch_nn_faster: a forward with grad enabled in eval mode counts as inference;
            # under autocast too: torch.nn's forward then autocasts itself)
            training = self.training and torch.is_grad_enabled() and w.requires_grad
            nn_why = (torch_nn_faster_low_precision(call, backend, torch.is_grad_enabled() and (
                          x.requires_grad or w.requires_grad), True, bf16)
                      or torch_nn_faster(call, x.shape[0], isinstance(input, PackedSequence), training,
                                         self.input_size, bf16)
                      or torch_nn_instead_of_reference(call, backend.name, why))
            out = self._torch_nn_forward(nn_why, backend, call, input, hx) if nn_why else None
            if out is not None:
                return out
        if call.dtype in backend.float32_for:  # results cast back to the call's dtype
            x, hs, finish = x if bf16 else x.float(), [h.float() for h in hs], _cast_back(finish, x.dtype)
            cast = torch.bfloat16 if bf16 else torch.float32
            why += "; bfloat16 products, float32 states" if bf16 else "; computed in float32"
        elif bf16:  # float32 under matmul precision "medium": the weights' products in bfloat16
            cast = torch.bfloat16
            why += "; bfloat16 products (float32 matmul precision 'medium'), float32 states"
        self._record_choice(backend.name, why)
        fwd = backend.op(self._cell, "forward")
        # One step (e.g. step-by-step decoding): the backend's cell op, if it has one, does the
        # projection and the step in one call (the per-call overhead is most of a small step).
        step = backend.cell_op(self._cell) if x.shape[0] == 1 and lengths is None else None
        with below_autograd_if_no_grad(), (AC.autocast_off(x.device.type) if cast else contextlib.nullcontext()):
            out = self._layers(fwd, step, x, lengths, hs, finish, names, cast, backend.projection_op, rows,
                               backend.direction_pairs)
        if backend.kernel_choice is not None:
            self._record_choice(backend.name, f"{why}; kernels: {backend.kernel_choice()}")
        elif (step is not None and cast is None and type(input) is Tensor and input.dim() == 3
              and getattr(self, "proj_size", 0) == 0 and not torch.is_grad_enabled()):
            # (one step of a batched tensor that ran the cell ops as they are: the next such
            # call may take _fast_step)
            self.__dict__["_fused_fast"] = (self.backend, x.dtype, x.device, backend, why, step, fwd)
        return out

    def _fast_step(self, fast, input, hx):
        """The forward's result for an inference call like the last one-step call that ran the
        cell ops (a batched tensor of one step, no autocast, no transform, the same backend
        setting, dtype and device, and `select` still choosing that backend), with the checks
        reduced to what such a call can get wrong: input and states of the expected shapes,
        dtype and device (anything else goes the long way, which raises torch.nn's errors). None
        where it does not apply. (As the cells' _fast_step: decoding one step at a time with a
        small model spent most of a step in the forward's Python.)"""
        setting, dtype, device, backend, why, step, fwd = fast
        if not fast_step_applies(self, setting, dtype, device, input, 3):
            return None
        x = input.transpose(0, 1) if self.batch_first else input
        T, B, I = x.shape
        w_ih, w_hh = self._flat_weights[0], self._flat_weights[1]  # (the long way's dtype and device checks' weights)
        if T != 1 or I != self.input_size or w_ih.dtype != dtype or w_hh.device != device:
            return None
        lstm, H = self._cell == "lstm", self.hidden_size
        hs = fast_step_states(hx, x, (self.num_layers * (2 if self.bidirectional else 1), B, H), lstm)
        if hs is None:
            return None
        if select(self.backend, Call(self._cell, device, dtype, H, 0, B))[0] is not backend:
            return None
        self._record_choice(backend.name, why)
        batch_first = self.batch_first

        def finish(y, states):
            return (y.transpose(0, 1) if batch_first else y), (tuple(states) if lstm else states[0])

        with torch._C._AutoDispatchBelowAutograd():
            return self._layers(fwd, step, x, None, hs, finish, self._weight_names(), None, backend.projection_op,
                                None, backend.direction_pairs)

    def _project(self, layer_in, weights, bf16, native, rows):
        """One layer and direction's input projection gx (weights: as _sequence_layer's).
        GRU: x @ w_ih^T + b_ih (b_hh stays inside the op: PyTorch's
        n = tanh(x_n + r * (W_hn h + b_hn))); LSTM and RNN: + b_hh too."""
        w_ih, _, b_ih, b_hh, _ = weights
        if bf16:  # (the biases summed in float32)
            b_ih, b_hh = (None if t is None else t.float() for t in (b_ih, b_hh))
        b = b_ih if self._cell == "gru" or b_ih is None else b_ih + b_hh
        if bf16:
            # x and w_ih go to the cpu backend's bfloat16 projection (float32 gx), w_hh to the
            # sequence op as it is (its bfloat16 dot products); biases and w_hr in float32
            return torch.ops.fusedrnn.projection_bf16(layer_in.to(w_ih.dtype), w_ih, b)
        return input_projection(layer_in, w_ih, b, native, rows)  # (a PackedSequence: its rows only)

    def _sequence_layer(self, fwd, layer_in, state, weights, lengths, d, native, rows):
        """One layer and direction through the input projection and the sequence op `fwd`:
        (y, [h_n] or [h_n, c_n]). `native`: the backend has the projection op (projection.py);
        `rows`: see _prepare."""
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        bf16 = w_hh.dtype != state[0].dtype  # bfloat16 weights, float32 states (see forward)
        gx = self._project(layer_in, weights, bf16, native, rows)
        if bf16:
            b_hh, w_hr = (None if t is None else t.float() for t in (b_hh, w_hr))
        if self._cell == "gru":
            train = records_grad(gx, state[0], w_hh, b_hh)
            y, h_n, *_ = fwd(gx, state[0], w_hh, b_hh, lengths, bool(d), train)
            new = [h_n]
        elif self._cell == "lstm":
            train = records_grad(gx, state[0], state[1], w_hh, w_hr)
            y, h_n, c_n, *_ = fwd(gx, state[0], state[1], w_hh, w_hr, lengths, bool(d), train)
            new = [h_n, c_n]
        else:
            y, h_n = fwd(gx, state[0], w_hh, lengths, bool(d), self.nonlinearity == "relu")
            new = [h_n]
        return y, new

    def _direction_pair(self, layer_in, states, weights, lengths, native, rows):
        """Both directions of a layer in one call of the backend's pair op (bidirectional.py):
        ([y0, y1], [final states of direction 0], [of direction 1]). Where nothing records a
        gradient, the weights are in the states' dtype and the pair runs them at once."""
        gx = [self._project(layer_in, w, False, native, rows) for w in weights]
        y0, y1, new0, new1 = forward_pair(self._cell, getattr(self, "nonlinearity", "") == "relu", gx, states, weights,
                                          lengths)
        return [y0, y1], [new0, new1]

    def _dropout(self, y, rows):
        """Dropout between layers on the tensor torch.nn drops out, so that the same seed
        draws the same mask: the layer's output [T, B, D * H], or a PackedSequence's rows
        [N, D * H] (its padded rows stay 0: the next layer never reads them)."""
        if rows is None:  # (a PackedSequence of full-length sequences: y's rows are its rows, in order)
            return F.dropout(y, self.dropout, training=True)
        flat = y.reshape(-1, y.shape[-1])
        kept = F.dropout(flat.index_select(0, rows), self.dropout, training=True)
        return torch.zeros_like(flat).index_copy(0, rows, kept).view_as(y)

    def _layers(self, fwd, step, x, lengths, hs, finish, names, cast, native, rows, pair):
        """The layers on x (`pair`: the backend runs a layer's two directions in one op call
        in inference, bidirectional.py)."""
        D = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in hs]
        layer_in = x
        for layer in range(self.num_layers):
            weights, states = [], []
            for d in range(D):
                idx = layer * D + d
                w = tuple(self._param(n) for n in names[idx])
                if cast is not None:  # autocast: weights in the dtype the recurrence runs in
                    w = tuple(t if t is None else t.to(cast) for t in w)
                weights.append(w)
                states.append([h[idx] for h in hs])
            # (cheapest checks first: small layers are where the pair pays, and where a few
            # microseconds of checks per layer show. Not under torch.compile: Dynamo cannot
            # trace the C++ rule, and a fullgraph compile must not break on it.)
            if (pair and D == 2 and step is None and not torch.compiler.is_compiling()
                    and pair_at_once(layer_in.shape[0], layer_in.shape[1], weights[0][1])
                    and weights[0][1].dtype == states[0][0].dtype
                    and not _layer_records_grad(layer_in, weights, states)):
                outs, news = self._direction_pair(layer_in, states, weights, lengths, native, rows)
            else:
                outs, news = [], []
                for d in range(D):
                    w_ih, w_hh, b_ih, b_hh, w_hr = weights[d]
                    if step is not None and w_hr is None:  # T = 1: projection and step in one cell op call
                        new = self._cell_op_step(step, layer_in[0], states[d], w_ih, w_hh, b_ih, b_hh)
                        y = new[0].unsqueeze(0)
                    else:
                        y, new = self._sequence_layer(fwd, layer_in, states[d], weights[d], lengths, d, native, rows)
                    outs.append(y)
                    news.append(new)
            for new in news:
                for f, s in zip(finals, new):
                    f.append(s)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = self._dropout(layer_in, rows)
        return finish(layer_in, [f[0].unsqueeze(0) if len(f) == 1 else torch.stack(f, 0) for f in finals])


class LSTM(_FusedRNNBase, nn.LSTM):
    """Drop-in torch.nn.LSTM; extra keyword: backend ("auto", "cpu", "cuda", "triton", "reference", ...)."""
    _cell, _torch_name = "lstm", "LSTM"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class GRU(_FusedRNNBase, nn.GRU):
    """Drop-in torch.nn.GRU; extra keyword: backend."""
    _cell, _torch_name = "gru", "GRU"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class RNN(_FusedRNNBase, nn.RNN):
    """Drop-in torch.nn.RNN (tanh or relu); extra keyword: backend."""
    _cell, _torch_name = "rnn", "RNN"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)

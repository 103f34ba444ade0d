"""PyTorch drop-in: ``fusedrnn.torch.RNN``, ``GRU`` and ``LSTM`` behave like ``torch.nn``'s.

    import fusedrnn.torch as frnn
    lstm = frnn.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True)
    model = frnn.convert(model)          # or swap every torch.nn RNN/GRU/LSTM in a model

Same constructor, validation, parameter names, shapes, order and initialisation as
torch.nn (the modules derive from ``torch.nn.RNNBase``, whose constructor they use), so
``load_state_dict(strict=True)`` works both ways; the same forward (batched and unbatched
input, ``batch_first``, h0 or (h0, c0), PackedSequence in -> PackedSequence out,
inter-layer dropout in training mode). The work is done by fusedrnn's fused kernels, one
call per layer and direction, registered as torch custom operators (``fusedrnn._torch_ops``)
so autograd and ``torch.compile(fullgraph=True)`` see them. No equations here: glue only.
CPU tensors (float32/float64) run on the CPU kernels; CUDA tensors (float32, float16,
bfloat16) on the CUDA backend when it is built and sees a device
(``fusedrnn.cuda_available()``), projection and checkpoint included.

This module imports torch; ``import fusedrnn`` never imports it. See docs/torch.md.

Shape legend (shared/DESIGN.md section 2): T steps, B batch, I input size, H hidden size,
P output size of a layer (proj_size, or H), D directions (1 or 2), L num_layers.
"""

from __future__ import annotations

import functools
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ._torch_ops import (check_device, check_dtype, direct_inference,
                         run_layer, run_stack_inference, supported_dtypes)

__all__ = ["RNN", "GRU", "LSTM", "convert"]

#: the dtypes fusedrnn runs on the CPU
_CPU_DTYPES = supported_dtypes("cpu")

#: torch.nn mode -> fusedrnn cell
_CELLS = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "GRU": "gru", "LSTM": "lstm"}


class _FusedRNNBase(torch.nn.RNNBase):
    """torch.nn.RNNBase (constructor, parameters, init, state dict) with a fused forward.

    Not a subclass of torch.nn.RNN/GRU/LSTM on purpose: torch.compile graph-breaks on
    those classes (torch._dynamo.config.allow_rnn), and traces these.

    ``checkpoint`` (attribute, default False): set it to True (state kept every
    ceil(sqrt(T)) steps) or an int k to train with fusedrnn's memory-saving cache;
    backward then recomputes the steps in between (``fusedrnn.forward(checkpoint=)``).
    """

    checkpoint = False

    # ----------------------------------------------------------------- checks

    def _weight(self, name: str) -> Tensor:
        # the registered Parameter, or (parametrized, or set as a plain attribute) the
        # attribute: getattr alone goes through Module.__getattr__, ~1 us a weight
        w = self._parameters.get(name)
        return w if w is not None else getattr(self, name)

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        """torch.nn's checks (same exception types), plus what fusedrnn can run."""
        w = self._weight(self._flat_weights_names[0])
        if input.dtype != w.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(
                f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.shape[-1]:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}")
        if input.is_cpu and w.is_cpu:  # (is_cpu: a tenth of the time of .device)
            if w.dtype in _CPU_DTYPES:
                return  # what fusedrnn runs everywhere (the common case, without the calls below)
            device = input.device
        elif (device := input.device) != w.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input "
                f"tensor at {device} and parameter tensor at {w.device}")
        check_device(input)
        who = f"fusedrnn.torch.{type(self).__name__}"
        check_dtype(w.dtype, device, who)

    def _check_hidden(self, hx: Tensor, input: Tensor, expected, msg: str) -> None:
        if hx.shape != expected:  # (torch.Size is a tuple)
            raise RuntimeError(msg.format(tuple(expected), list(hx.size())))
        if hx.dtype != input.dtype:
            raise RuntimeError(
                f"Expected the hidden state to have the input's dtype {input.dtype}, "
                f"got {hx.dtype}")
        if not (hx.is_cpu and input.is_cpu) and hx.device != input.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {hx.device}")

    def _expected_sizes(self, B) -> Tuple[tuple, tuple]:
        """Shapes of h0 and c0: (L*D, B, P) and (L*D, B, H)."""
        LD = self.num_layers * (2 if self.bidirectional else 1)
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (LD, B, P), (LD, B, self.hidden_size)

    # ---------------------------------------------------------------- forward

    def _forward(self, input, hx=None):
        """torch.nn's forward: argument handling mirrors torch.nn.RNN/GRU/LSTM.forward."""
        lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        sorted_indices = unsorted_indices = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(data, batch_sizes)
            if sorted_indices is not None:
                B = sorted_indices.numel()
            elif hx is not None and torch.compiler.is_compiling():
                # reading batch_sizes[0] would graph-break; eager mode checks hx against it
                B = (hx[0] if lstm else hx).shape[1]
            else:
                B = int(batch_sizes[0])
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                name = {"LSTM": "LSTM", "GRU": "GRU"}.get(self.mode, "RNN")
                tail = "tensor instead" if name == "RNN" else "instead"
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D {tail}")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                want = 3 if is_batched else 2
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if lstm:
                    if hx[0].dim() != want or hx[1].dim() != want:
                        raise RuntimeError(
                            f"For {kind} input, hx and cx should also be {want}-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    if not is_batched:
                        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                else:
                    if hx.dim() != want:
                        raise RuntimeError(
                            f"For {kind} input, hx should also be {want}-D but got "
                            f"{hx.dim()}-D tensor")
                    if not is_batched:
                        hx = hx.unsqueeze(1)
            self.check_input(input, None)
            B = input.size(0) if self.batch_first else input.size(1)
        x = data if packed else input  # [N, I] packed rows, or [T, B, I] / [B, T, I]
        if hx is not None:
            h_size, c_size = self._expected_sizes(B)
            if lstm:
                self._check_hidden(hx[0], x, h_size, "Expected hidden[0] size {}, got {}")
                self._check_hidden(hx[1], x, c_size, "Expected hidden[1] size {}, got {}")
            else:
                self._check_hidden(hx, x, h_size, "Expected hidden size {}, got {}")
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        w_dtype = self._weight(self._flat_weights_names[0]).dtype
        if x.dtype != w_dtype:  # only under autocast (see check_input): run in the weights' dtype
            x = x.to(w_dtype)
            h0, c0 = (None if t is None else t.to(w_dtype) for t in (h0, c0))

        if packed:
            x, lengths, pad_index, pack_index = _packed_to_padded(x, batch_sizes, B)
            y, h_n, c_n = self._run_stack(x, h0, c0, lengths, batch_first=False)
            y = _PaddingGather.apply(y.reshape(-1, y.shape[-1]), pack_index, pad_index)
            out = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
        else:
            T = x.size(1) if self.batch_first else x.size(0)
            if T == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            out, h_n, c_n = self._run_stack(x, h0, c0, None, self.batch_first)
            if not is_batched:
                out = out.squeeze(batch_dim)
                h_n = h_n.squeeze(1)
                c_n = None if c_n is None else c_n.squeeze(1)
        hidden = (h_n, c_n) if lstm else h_n
        return out, self.permute_hidden(hidden, unsorted_indices)

    def _stack_weights(self) -> List[tuple]:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of every layer and direction (layer l, direction d
        at l * D + d); None where absent."""
        return [tuple(None if n is None else self._weight(n) for n in names)
                for names in _stack_names(self.num_layers, 2 if self.bidirectional else 1,
                                          bool(self.bias), self.proj_size > 0)]

    def _run_stack(self, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                   lengths: Optional[Tensor], batch_first: bool):
        """All layers and directions: x [T, B, I] (or [B, T, I]) -> (y [T, B, D*P],
        h_n [L*D, B, P], c_n [L*D, B, H] or None). One fused call per layer and direction."""
        cell = _CELLS[self.mode]
        D = 2 if self.bidirectional else 1
        L = self.num_layers
        weights = self._stack_weights()
        dropout = self.dropout > 0 and self.training and L > 1
        if not dropout and direct_inference((x, h0, c0, lengths, *_flat(weights))):
            return run_stack_inference(cell, x, weights, h0, c0, lengths, D, batch_first,
                                       self.checkpoint)
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(L):
            ys = []
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
                y, h, c = run_layer(cell, x, w_ih, w_hh, b_ih, b_hh,
                                    None if h0 is None else h0[k],
                                    None if c0 is None else c0[k],
                                    w_hr, lengths, d == 1, batch_first, self.checkpoint)
                ys.append(y)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = ys[0] if D == 1 else torch.cat(ys, dim=2)
            if dropout and layer < L - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, _stack(h_n), (_stack(c_n) if c_n else None)


def _flat(weights) -> Tuple[Optional[Tensor], ...]:
    """The tensors of _run_stack's per-layer weight tuples, in one tuple."""
    return weights[0] if len(weights) == 1 else tuple(w for ws in weights for w in ws)


def _stack(ts: List[Tensor]) -> Tensor:
    """torch.stack, by a view for one tensor (the common single-layer case)."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


@functools.lru_cache(maxsize=None)
def _stack_names(L: int, D: int, bias: bool, proj: bool):
    """_layer_names of every layer and direction: layer l, direction d at l * D + d."""
    return tuple(_layer_names(layer, d, bias, proj) for layer in range(L) for d in range(D))


@functools.lru_cache(maxsize=None)
def _layer_names(layer: int, direction: int, bias: bool, proj: bool):
    """torch.nn's parameter names (w_ih, w_hh, b_ih, b_hh, w_hr) of a layer and
    direction; None where the module has no such parameter."""
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    return (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}" if bias else None,
            f"bias_hh{sfx}" if bias else None, f"weight_hr{sfx}" if proj else None)


class _PaddingGather(torch.autograd.Function):
    """rows = src.index_select(0, index), for the packed <-> padded conversions only.

    The two index maps are inverse to each other on the *valid* positions (t < lengths[b])
    and the rows at padded positions are only ever read by fusedrnn's kernels, which
    ignore padded inputs (their input gradient there is 0) and padded output gradients.
    So the backward is a gather too, ``grad.index_select(0, back_index)``, instead of the
    zero-fill + scatter-add of index_select's own backward: exact for this use, and
    several times cheaper. Not a general-purpose op.
    """

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, back_index: Tensor) -> Tensor:
        ctx.save_for_backward(back_index)
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (back_index,) = ctx.saved_tensors
        return grad.index_select(0, back_index), None, None


def _packed_to_padded(data: Tensor, batch_sizes: Tensor, B: int):
    """Packed rows -> (x [T, B, I] time-major, lengths [B] int64 on batch_sizes' device
    (torch keeps it on the CPU), pad_index [T*B], pack_index [N] on data's device).

    Rows of a PackedSequence are in sorted order: packed row start[t] + b holds step t
    of sequence b, for b < batch_sizes[t]. ``pad_index[t*B + b]`` is that packed row
    (row 0 at padded positions, which the kernels never read); ``pack_index[n]`` is the
    position t*B + b of packed row n in a flattened [T*B] padded tensor. All shapes are
    static (T, B, N), so this traces under torch.compile.
    """
    T, N = batch_sizes.shape[0], data.shape[0]
    dev = data.device
    bs = batch_sizes.to(device=dev, dtype=torch.int64)            # [T]
    b = torch.arange(B, device=dev)                                # [B]
    valid = b[None, :] < bs[:, None]                               # [T, B]
    if batch_sizes.device == dev:
        lengths = valid.sum(0)                                     # [B]
    else:
        # CUDA data: lengths from the CPU batch_sizes, on the CPU, where the kernels read
        # them; lengths on the device would cost a device-to-host copy (a sync) per layer
        host = batch_sizes.device
        lengths = (torch.arange(B, device=host)[None, :]
                   < batch_sizes.to(torch.int64)[:, None]).sum(0)
    end = torch.cumsum(bs, 0)                                      # [T]
    start = end - bs                                               # [T]
    pad_index = torch.where(valid, start[:, None] + b[None, :], 0).reshape(-1)  # [T*B]
    n = torch.arange(N, device=dev)                                # [N]
    t = torch.searchsorted(end, n, right=True)                     # [N] step of row n
    pack_index = t * B + (n - start[t])                            # [N]
    x = _PaddingGather.apply(data, pad_index, pack_index).view(T, B, data.shape[1])
    return x, lengths, pad_index, pack_index


class RNN(_FusedRNNBase):
    r"""Elman RNN (tanh or relu), like :class:`torch.nn.RNN`, run by fusedrnn.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``forward(input, hx=None) -> (output, h_n)``. See torch.nn.RNN for the shapes.
    """

    def __init__(self, *args, **kwargs):
        # argument handling copied from torch.nn.RNN.__init__ (same errors)
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    def forward(self, input, hx: Optional[Tensor] = None):
        """input [T, B, I] / [B, T, I] / [T, I] / PackedSequence; hx [L*D, B, H] or
        [L*D, H] -> (output [T, B, D*H] (or like input), h_n [L*D, B, H])."""
        return self._forward(input, hx)


class GRU(_FusedRNNBase):
    r"""GRU, like :class:`torch.nn.GRU`, run by fusedrnn.

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None)``;
    ``forward(input, hx=None) -> (output, h_n)``. See torch.nn.GRU for the shapes.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx: Optional[Tensor] = None):
        """input [T, B, I] / [B, T, I] / [T, I] / PackedSequence; hx [L*D, B, H] or
        [L*D, H] -> (output [T, B, D*H] (or like input), h_n [L*D, B, H])."""
        return self._forward(input, hx)


class LSTM(_FusedRNNBase):
    r"""LSTM, like :class:`torch.nn.LSTM`, run by fusedrnn.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)``;
    ``forward(input, hx=None) -> (output, (h_n, c_n))``. See torch.nn.LSTM for the shapes.
    ``proj_size > 0`` runs on the kernels' LSTM projection (``fusedrnn.forward(..., w_hr=)``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def permute_hidden(self, hx, permutation: Optional[Tensor]):
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        """input [T, B, I] / [B, T, I] / [T, I] / PackedSequence; hx (h0 [L*D, B, P],
        c0 [L*D, B, H]) or unbatched -> (output [T, B, D*P], (h_n, c_n))."""
        return self._forward(input, hx)


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------

_FUSED = {torch.nn.RNN: RNN, torch.nn.GRU: GRU, torch.nn.LSTM: LSTM}


def _fused_copy(m: torch.nn.RNNBase) -> _FusedRNNBase:
    """A fusedrnn module with m's hyperparameters that shares m's Parameter objects."""
    kwargs = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional, device="meta")
    if type(m) is torch.nn.LSTM:
        kwargs["proj_size"] = m.proj_size
    if type(m) is torch.nn.RNN:
        kwargs["nonlinearity"] = m.nonlinearity
    with warnings.catch_warnings():  # torch's dropout-with-one-layer warning came already
        warnings.simplefilter("ignore", UserWarning)
        new = _FUSED[type(m)](m.input_size, m.hidden_size, **kwargs)
    for name in m._flat_weights_names:  # the same Parameter objects: optimizers keep working
        setattr(new, name, getattr(m, name))
    new._init_flat_weights()
    new.train(m.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        getattr(new, hooks).update(getattr(m, hooks))
    return new


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.RNN, GRU and LSTM inside ``model`` by its fusedrnn equivalent.

    The replacement shares the original's Parameter objects (same weights, no copy; an
    optimizer built before ``convert`` keeps training them), hyperparameters, training
    mode and hooks. Works in place and returns ``model``, or the new module when
    ``model`` itself is an RNN/GRU/LSTM. Only those exact classes are converted
    (``proj_size`` included); subclasses may override ``forward`` and are left alone.
    """
    def swap(m):
        return _fused_copy(m) if type(m) in _FUSED else m

    new = swap(model)
    if new is not model:
        return new
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = swap(child)
            if replacement is not child:
                setattr(parent, name, replacement)
    return model

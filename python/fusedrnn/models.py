"""Recurrent models on NumPy arrays, built on fusedrnn's layer kernels.

- ``RNN``: a stack of ``num_layers`` recurrent layers (any cell), optionally
  bidirectional, with dropout between layers.  Each layer and direction is one
  call of the backend's ``forward`` / ``backward`` (the whole sequence at once),
  so the stack runs without Python per time step.
- ``Linear``: a dense layer y = x W^T + b over the last axis.
- ``RNNModel``: ``RNN`` followed by a ``Linear`` output layer, either per step
  (``output="sequence"``) or once per row on the final state (``output="last"``).
- Losses: ``mse_loss`` and ``cross_entropy`` (per step or per sequence, masked by
  lengths or a mask); each returns the loss and its gradient.
- ``truncated_bptt``: the gradient of a sequence loss computed chunk by chunk,
  with the final states of one chunk feeding the next and the gradient cut (or
  not) at chunk boundaries.
- ``save`` / ``load``: all parameters in an ``.npz`` file, with the model's
  configuration; ``load`` checks class, cell and every shape.

Shape legend (shared/DESIGN.md section 2): T steps, B batch, I input size,
H hidden size, G gates, L layers, D directions (1, or 2 when bidirectional),
O output size, C classes.  Time-major by default: x [T, B, I], y [T, B, D*H]
(``batch_first``: [B, T, ...]); states h0, c0, h_n, c_n [L*D, B, H] with index
``layer*D + direction`` (direction 1 runs backwards in time), as ``torch.nn``.

Parameters live in an ordered dict ``model.params`` (name -> ndarray) with
``torch.nn``'s names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...; an
``RNNModel`` prefixes them with ``rnn.`` and adds ``linear.weight``,
``linear.bias``), so a ``torch.nn`` ``state_dict`` maps onto them one to one.
Optimizers (``fusedrnn.optim``) update these arrays in place.

Gradients: ``backward`` returns ``(grads, dinputs)``: ``grads`` has exactly the
keys of ``params``; ``dinputs`` has ``x`` (x's shape), ``h0`` and ``c0``
([L*D, B, H]; ``c0`` None unless lstm).

Every model takes ``backend``: a module with fusedrnn's ``forward``/``backward``
API, ``fusedrnn`` (compiled, the default) or ``fusedrnn.reference`` (NumPy).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import _validate

__all__ = ["RNN", "Linear", "RNNModel", "mse_loss", "cross_entropy", "accuracy",
           "valid_steps", "truncated_bptt", "save", "load", "load_model", "FORMAT"]

#: written into every saved file, checked on load
FORMAT = "fusedrnn.models/1"
_META_KEY = "__fusedrnn__"
_OUTPUTS = ("sequence", "last")


# --------------------------------------------------------------------------
# Argument checks (messages name the argument, as everywhere in fusedrnn)
# --------------------------------------------------------------------------

def _int_arg(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _bool_arg(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _cell_arg(cell):
    if not isinstance(cell, str):
        raise TypeError(f"cell must be a str, one of {sorted(_validate.GATES)}, "
                        f"got {type(cell).__name__}")
    if cell not in _validate.GATES:
        raise ValueError(f"cell must be one of {sorted(_validate.GATES)}, got {cell!r}")
    return cell


def _dtype_arg(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _validate.DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _backend_arg(backend):
    if backend is None:
        import fusedrnn  # the package itself; imported lazily, it may be initialising
        return fusedrnn
    if not (callable(getattr(backend, "forward", None))
            and callable(getattr(backend, "backward", None))):
        raise TypeError("backend must be a module with fusedrnn's forward/backward API "
                        f"(fusedrnn or fusedrnn.reference), got {backend!r}")
    return backend


def _input_arg(name, x, dtype, ndim, layout):
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, the model's dtype is {dtype} "
                        f"(convert with {name}.astype(np.{dtype}))")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {x.shape}")
    return x


def _cache_arg(cache, cache_type, owner):
    """``cache`` must be a ``cache_type`` made by ``owner``'s forward."""
    if cache is None:
        raise TypeError("backward needs the cache returned by forward(..., training=True); "
                        "got None")
    if not isinstance(cache, cache_type) or cache.owner is not owner:
        raise TypeError(f"cache must come from this model's forward, got "
                        f"{type(cache).__name__}")


def _seed_sequences(seed, n):
    """``n`` independent seed sequences from an int, a SeedSequence or None (fresh entropy)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed.spawn(n)
    if seed is not None and (isinstance(seed, (bool, np.bool_))
                             or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return np.random.SeedSequence(seed).spawn(n)


def _uniform(rng, shape, bound, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# --------------------------------------------------------------------------
# The recurrent stack
# --------------------------------------------------------------------------

class _StackCache:
    """What ``RNN.backward`` needs: one backend cache per layer and direction,
    and the dropout masks applied to the inputs of layers 1..L-1."""

    __slots__ = ("owner", "caches", "drop_masks", "x_shape", "batch_first", "B")

    def __init__(self, owner, caches, drop_masks, x_shape, batch_first, B):
        self.owner = owner
        self.caches = caches  # [L][D] backend caches
        self.drop_masks = drop_masks  # [L] None or [T, B, D*H] (x's layout) scaled keep mask
        self.x_shape = x_shape
        self.batch_first = batch_first
        self.B = B

    @property
    def nbytes(self) -> int:
        n = sum(c.nbytes for layer in self.caches for c in layer)
        return int(n + sum(m.nbytes for m in self.drop_masks if m is not None))


class RNN:
    """A stack of recurrent layers, optionally bidirectional (``torch.nn.RNN/LSTM/GRU``).

    Args:
        cell: "rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm" or "gru".
        input_size: I, features per step of the input.
        hidden_size: H, features of each direction's state.
        num_layers: L; layer k > 0 reads the previous layer's output (D*H features:
            forward then backward direction, concatenated).
        bidirectional: add a second direction per layer that runs backwards in time
            (with lengths, row b starts at its own last step, as packed sequences).
        dropout: probability p of zeroing an input feature of layers 1..L-1 during
            training (kept features are scaled by 1/(1-p)); 0 <= p < 1.
        bias: with b_ih, b_hh (else they are absent and zero).
        dtype: float32 (default) or float64; inputs must have this dtype.
        seed: seeds the initialisation and the model's dropout generator
            (``self.rng``); None draws fresh entropy.  Same seed, same results.
        backend: module with fusedrnn's forward/backward (default ``fusedrnn``;
            ``fusedrnn.reference`` runs the NumPy oracle).

    Initialisation as ``torch.nn``: every weight and bias uniform in
    [-1/sqrt(H), 1/sqrt(H)].
    """

    def __init__(self, cell, input_size, hidden_size, num_layers=1, *, bidirectional=False,
                 dropout=0.0, bias=True, dtype=np.float32, seed=None, backend=None):
        self.cell = _cell_arg(cell)
        self.input_size = _int_arg("input_size", input_size, 1)
        self.hidden_size = _int_arg("hidden_size", hidden_size, 1)
        self.num_layers = _int_arg("num_layers", num_layers, 1)
        self.bidirectional = _bool_arg("bidirectional", bidirectional)
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(
                dropout, (int, float, np.floating, np.integer)):
            raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.bias = _bool_arg("bias", bias)
        self.dtype = _dtype_arg(dtype)
        self.backend = _backend_arg(backend)
        self.seed = seed
        init_seq, drop_seq = _seed_sequences(seed, 2)
        self.rng = np.random.Generator(np.random.PCG64(drop_seq))  # dropout masks
        self.G = _validate.GATES[self.cell]
        self.D = 2 if self.bidirectional else 1
        self.params: Dict[str, np.ndarray] = {}
        init_rng = np.random.Generator(np.random.PCG64(init_seq))
        self.reset_parameters(init_rng)

    # ---- parameters -------------------------------------------------------

    def layer_names(self, layer, direction):
        """Parameter names (w_ih, w_hh, b_ih, b_hh) of one layer and direction;
        the biases are None without bias."""
        sfx = f"l{layer}" + ("_reverse" if direction else "")
        b = (f"bias_ih_{sfx}", f"bias_hh_{sfx}") if self.bias else (None, None)
        return (f"weight_ih_{sfx}", f"weight_hh_{sfx}") + b

    def layer_input_size(self, layer):
        return self.input_size if layer == 0 else self.D * self.hidden_size

    def reset_parameters(self, rng=None):
        """(Re)draw every parameter from U(-1/sqrt(H), 1/sqrt(H)), in torch.nn's order."""
        rng = np.random.default_rng() if rng is None else rng
        H, GH, k = self.hidden_size, self.G * self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        for layer in range(self.num_layers):
            for d in range(self.D):
                n_ih, n_hh, n_bih, n_bhh = self.layer_names(layer, d)
                shapes = [(n_ih, (GH, self.layer_input_size(layer))), (n_hh, (GH, H))]
                if self.bias:
                    shapes += [(n_bih, (GH,)), (n_bhh, (GH,))]
                for name, shape in shapes:
                    new = _uniform(rng, shape, k, self.dtype)
                    if name in self.params:
                        self.params[name][...] = new  # in place: optimizers hold these arrays
                    else:
                        self.params[name] = new

    def reseed(self, seed):
        """Restart the dropout generator from ``seed`` (e.g. before a reproducible run)."""
        self.rng = np.random.default_rng(seed)

    @property
    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def config(self) -> dict:
        """The constructor arguments (except seed and backend), JSON-serialisable."""
        return {"cell": self.cell, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bidirectional": self.bidirectional, "dropout": self.dropout,
                "bias": self.bias, "dtype": str(self.dtype)}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # ---- forward / backward ----------------------------------------------

    def _state_arg(self, name, s, B):
        if s is None:
            return None
        shape = (self.num_layers * self.D, self.hidden_size)
        s = _input_arg(name, s, self.dtype, 3, "[L*D, B, H]")
        if s.shape != (shape[0], B, shape[1]):
            raise ValueError(f"{name} must have shape [L*D, B, H] = {(shape[0], B, shape[1])}, "
                             f"got {s.shape}")
        return s

    def forward(self, x, h0=None, c0=None, *, lengths=None, mask=None, batch_first=False,
                training=True, checkpoint=False):
        """Run the whole stack over a sequence.

        Args:
            x: [T, B, I] ([B, T, I] with ``batch_first``), the model's dtype.
            h0, c0: [L*D, B, H] initial states or None (zeros); c0 only for lstm.
            lengths / mask: as ``fusedrnn.forward`` (one rule for every layer and
                direction; the backward direction of a row starts at its last step).
            training: apply dropout and keep the cache for ``backward``.
            checkpoint: every layer's cache keeps its state only every ceil(sqrt(T))
                steps (True) or every k steps (an int), and ``backward`` recomputes
                the rest: less memory, one more forward pass (``fusedrnn.forward``).

        Returns:
            y [T, B, D*H] (last layer, directions concatenated; [B, T, D*H] with
            ``batch_first``), h_n [L*D, B, H], c_n [L*D, B, H] or None, cache
            (None when not training).
        """
        batch_first = _bool_arg("batch_first", batch_first)
        training = _bool_arg("training", training)
        x = _input_arg("x", x, self.dtype, 3, "[B, T, I]" if batch_first else "[T, B, I]")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have input size I = {self.input_size} (last dimension), "
                             f"got shape {x.shape}")
        B = x.shape[0] if batch_first else x.shape[1]
        h0 = self._state_arg("h0", h0, B)
        if c0 is not None and self.cell != "lstm":
            raise ValueError(f"c0 is only used by cell 'lstm', got c0 for cell {self.cell!r}")
        c0 = self._state_arg("c0", c0, B)

        be, L, D, H = self.backend, self.num_layers, self.D, self.hidden_size
        h_n = np.empty((L * D, B, H), self.dtype)
        c_n = np.empty((L * D, B, H), self.dtype) if self.cell == "lstm" else None
        caches: List[list] = []
        drop_masks: List[Optional[np.ndarray]] = []
        inp = x
        for layer in range(L):
            m = None
            if layer > 0 and training and self.dropout > 0:
                keep = 1.0 - self.dropout
                m = (self.rng.random(inp.shape, dtype=self.dtype) < keep).astype(self.dtype)
                m /= self.dtype.type(keep)
                inp = inp * m
            drop_masks.append(m)
            outs, layer_caches = [], []
            for d in range(D):
                idx = layer * D + d
                w_ih, w_hh, b_ih, b_hh = (None if n is None else self.params[n]
                                          for n in self.layer_names(layer, d))
                y, hn, cn, cache = be.forward(
                    self.cell, inp, w_ih, w_hh, b_ih, b_hh,
                    None if h0 is None else h0[idx], None if c0 is None else c0[idx],
                    lengths=lengths, mask=mask, reverse=bool(d), batch_first=batch_first,
                    training=training, checkpoint=checkpoint)
                outs.append(y)
                layer_caches.append(cache)
                h_n[idx] = hn
                if c_n is not None:
                    c_n[idx] = cn
            caches.append(layer_caches)
            inp = outs[0] if D == 1 else np.concatenate(outs, axis=-1)
        cache = _StackCache(self, caches, drop_masks, x.shape, batch_first, B) if training else None
        return inp, h_n, c_n, cache

    def backward(self, cache, dy=None, dh_n=None, dc_n=None):
        """Gradients through ``forward``.

        Args:
            cache: from ``forward(..., training=True)`` of this model.
            dy: gradient w.r.t. y ([T, B, D*H] or [B, T, D*H]) or None (zeros).
            dh_n, dc_n: gradients w.r.t. h_n, c_n ([L*D, B, H]) or None (zeros).

        Returns:
            (grads, dinputs): grads maps every name of ``params`` to its gradient;
            dinputs has "x", "h0" [L*D, B, H] and "c0" ([L*D, B, H] or None).
        """
        _cache_arg(cache, _StackCache, self)
        L, D, H, B = self.num_layers, self.D, self.hidden_size, cache.B
        if dy is not None:
            yshape = cache.x_shape[:2] + (D * H,)
            dy = _input_arg("dy", dy, self.dtype, 3, "[B, T, D*H]" if cache.batch_first
                            else "[T, B, D*H]")
            if dy.shape != yshape:
                raise ValueError(f"dy must have the shape of y {yshape}, got {dy.shape}")
        dh_n = self._state_arg("dh_n", dh_n, B)
        if dc_n is not None and self.cell != "lstm":
            raise ValueError(f"dc_n is only used by cell 'lstm', got dc_n for cell {self.cell!r}")
        dc_n = self._state_arg("dc_n", dc_n, B)

        be = self.backend
        grads: Dict[str, np.ndarray] = {}
        dh0 = np.empty((L * D, B, H), self.dtype)
        dc0 = np.empty((L * D, B, H), self.dtype) if self.cell == "lstm" else None
        dinp = dy
        for layer in reversed(range(L)):
            dx = None
            for d in range(D):
                idx = layer * D + d
                dy_d = None
                if dinp is not None:
                    dy_d = dinp if D == 1 else dinp[..., d * H:(d + 1) * H]
                g = be.backward(cache.caches[layer][d], dy_d,
                                None if dh_n is None else dh_n[idx],
                                None if dc_n is None else dc_n[idx])
                n_ih, n_hh, n_bih, n_bhh = self.layer_names(layer, d)
                grads[n_ih], grads[n_hh] = g["w_ih"], g["w_hh"]
                if self.bias:
                    grads[n_bih], grads[n_bhh] = g["b_ih"], g["b_hh"]
                dh0[idx] = g["h0"]
                if dc0 is not None:
                    dc0[idx] = g["c0"]
                dx = g["x"] if dx is None else dx + g["x"]
            m = cache.drop_masks[layer]
            if m is not None:
                dx = dx * m
            dinp = dx
        grads = {name: grads[name] for name in self.params}  # params' order
        return grads, {"x": dinp, "h0": dh0, "c0": dc0}

    def save(self, path):
        save(self, path)

    def load(self, path):
        load(self, path)
        return self


# --------------------------------------------------------------------------
# Dense layer
# --------------------------------------------------------------------------

class Linear:
    """y = x W^T + b over the last axis (``torch.nn.Linear``): W [O, F], b [O].

    Initialisation as ``torch.nn.Linear``: W and b uniform in [-1/sqrt(F), 1/sqrt(F)].
    ``params`` holds "weight" and "bias" (no bias with ``bias=False``).
    """

    def __init__(self, in_features, out_features, *, bias=True, dtype=np.float32, seed=None):
        self.in_features = _int_arg("in_features", in_features, 1)
        self.out_features = _int_arg("out_features", out_features, 1)
        self.bias = _bool_arg("bias", bias)
        self.dtype = _dtype_arg(dtype)
        self.params: Dict[str, np.ndarray] = {}
        self.reset_parameters(np.random.default_rng(seed))

    def reset_parameters(self, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        k = 1.0 / math.sqrt(self.in_features)
        shapes = [("weight", (self.out_features, self.in_features))]
        if self.bias:
            shapes.append(("bias", (self.out_features,)))
        for name, shape in shapes:
            new = _uniform(rng, shape, k, self.dtype)
            if name in self.params:
                self.params[name][...] = new
            else:
                self.params[name] = new

    def forward(self, x):
        """x [..., F] -> [..., O]."""
        x = np.asarray(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the layer's dtype is {self.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., F] with F = {self.in_features}, "
                             f"got {x.shape}")
        y = x @ self.params["weight"].T
        if self.bias:
            y += self.params["bias"]
        return y

    def backward(self, x, dy):
        """Gradients of ``forward(x)`` given dy [..., O]: (grads, dx)."""
        x = np.asarray(x)
        dy = np.asarray(dy, dtype=self.dtype)
        if dy.shape != x.shape[:-1] + (self.out_features,):
            raise ValueError(f"dy must have shape {x.shape[:-1] + (self.out_features,)}, "
                             f"got {dy.shape}")
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        grads = {"weight": dy2.T @ x2}
        if self.bias:
            grads["bias"] = dy2.sum(axis=0)
        return grads, dy @ self.params["weight"]


# --------------------------------------------------------------------------
# Recurrent stack + output layer
# --------------------------------------------------------------------------

class _ModelCache:
    __slots__ = ("owner", "rnn", "feats", "out_shape")

    def __init__(self, owner, rnn, feats, out_shape):
        self.owner = owner
        self.rnn = rnn  # _StackCache
        self.feats = feats  # input of the output layer
        self.out_shape = out_shape

    @property
    def nbytes(self) -> int:
        return int(self.rnn.nbytes + self.feats.nbytes)


class RNNModel:
    """A recurrent stack (``RNN``) with a dense output layer (``Linear``).

    Args (besides those of ``RNN``):
        output_size: O, outputs per step (``output="sequence"``) or per row
            (``output="last"``); the number of classes for a classifier.
        output: "sequence": out[t, b] = W y[t, b] + b_y for every step (the last
            layer's output; at padded steps y is 0, so out is the bias there: give
            the loss the same lengths/mask).  "last": one output per row from the
            last layer's final states, out[b] = W [h_n fwd; h_n bwd] + b_y: the
            forward direction's state after the row's last valid step (lengths or
            mask respected; = y at that step) and, bidirectional, the backward
            direction's state after its whole pass.

    ``params``: "rnn.<torch name>" for the stack, "linear.weight" [O, D*H] and
    "linear.bias" [O].  The output layer is initialised as ``torch.nn.Linear``
    (uniform in +-1/sqrt(D*H)).
    """

    def __init__(self, cell, input_size, hidden_size, output_size, num_layers=1, *,
                 bidirectional=False, dropout=0.0, output="sequence", bias=True,
                 dtype=np.float32, seed=None, backend=None):
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {list(_OUTPUTS)}, got {output!r}")
        self.output = output
        rnn_seed, lin_seed = _seed_sequences(seed, 2)
        self.rnn = RNN(cell, input_size, hidden_size, num_layers, bidirectional=bidirectional,
                       dropout=dropout, bias=bias, dtype=dtype, seed=rnn_seed, backend=backend)
        self.linear = Linear(self.rnn.D * self.rnn.hidden_size, output_size, bias=bias,
                             dtype=dtype, seed=lin_seed)
        self.seed = seed
        self.params: Dict[str, np.ndarray] = {}
        self._link_params()

    def _link_params(self):
        self.params.clear()
        self.params.update({f"rnn.{k}": v for k, v in self.rnn.params.items()})
        self.params.update({f"linear.{k}": v for k, v in self.linear.params.items()})

    # convenience views of the configuration
    cell = property(lambda self: self.rnn.cell)
    dtype = property(lambda self: self.rnn.dtype)
    backend = property(lambda self: self.rnn.backend)
    input_size = property(lambda self: self.rnn.input_size)
    hidden_size = property(lambda self: self.rnn.hidden_size)
    num_layers = property(lambda self: self.rnn.num_layers)
    bidirectional = property(lambda self: self.rnn.bidirectional)
    output_size = property(lambda self: self.linear.out_features)

    @property
    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def reseed(self, seed):
        """Restart the dropout generator from ``seed``."""
        self.rnn.reseed(seed)

    def config(self) -> dict:
        c = self.rnn.config()
        c.update(output_size=self.output_size, output=self.output)
        return c

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def forward(self, x, h0=None, c0=None, *, lengths=None, mask=None, batch_first=False,
                training=True, checkpoint=False):
        """Returns (out, h_n, c_n, cache): out [T, B, O] ([B, T, O] with
        ``batch_first``) for ``output="sequence"``, [B, O] for "last";
        the rest as ``RNN.forward``."""
        y, h_n, c_n, rcache = self.rnn.forward(x, h0, c0, lengths=lengths, mask=mask,
                                               batch_first=batch_first, training=training,
                                               checkpoint=checkpoint)
        if self.output == "sequence":
            feats = y
        else:
            top = slice((self.rnn.num_layers - 1) * self.rnn.D, None)
            top_h = h_n[top]  # [D, B, H]
            feats = np.concatenate(list(top_h), axis=-1) if self.rnn.D == 2 else top_h[0].copy()
        out = self.linear.forward(feats)
        cache = _ModelCache(self, rcache, feats, out.shape) if training else None
        return out, h_n, c_n, cache

    def predict(self, x, h0=None, c0=None, *, lengths=None, mask=None, batch_first=False):
        """``forward`` without dropout or cache; returns out only."""
        return self.forward(x, h0, c0, lengths=lengths, mask=mask, batch_first=batch_first,
                            training=False)[0]

    def backward(self, cache, dout=None, dh_n=None, dc_n=None):
        """Gradients through ``forward``: dout like out (or None), dh_n/dc_n
        [L*D, B, H] (or None).  Returns (grads, dinputs) as ``RNN.backward``."""
        _cache_arg(cache, _ModelCache, self)
        rnn = self.rnn
        grads: Dict[str, np.ndarray] = {}
        dy = None
        if dout is not None:
            dout = _input_arg("dout", dout, self.dtype, len(cache.out_shape),
                              "like out")
            if dout.shape != cache.out_shape:
                raise ValueError(f"dout must have the shape of out {cache.out_shape}, "
                                 f"got {dout.shape}")
            lgrads, dfeats = self.linear.backward(cache.feats, dout)
            if self.output == "sequence":
                dy = dfeats
            else:
                B, H, D = cache.rnn.B, rnn.hidden_size, rnn.D
                LD = rnn.num_layers * D
                dh_n = (np.zeros((LD, B, H), self.dtype) if dh_n is None
                        else rnn._state_arg("dh_n", dh_n, B).copy())
                for d in range(D):
                    dh_n[LD - D + d] += dfeats[:, d * H:(d + 1) * H]
        else:
            lgrads = {k: np.zeros_like(v) for k, v in self.linear.params.items()}
        rgrads, dinputs = rnn.backward(cache.rnn, dy, dh_n, dc_n)
        grads.update({f"rnn.{k}": v for k, v in rgrads.items()})
        grads.update({f"linear.{k}": v for k, v in lgrads.items()})
        return grads, dinputs

    def save(self, path):
        save(self, path)

    def load(self, path):
        load(self, path)
        return self


# --------------------------------------------------------------------------
# Losses: each returns (loss as a Python float, gradient w.r.t. the prediction)
# --------------------------------------------------------------------------

def valid_steps(shape, lengths=None, mask=None, batch_first=False):
    """bool array of ``shape`` (the positions of a prediction: [T, B], [B, T] with
    ``batch_first``, or [B] per sequence) that are valid, or None when all are.

    lengths [B]: step t of row b is valid when t < lengths[b] (per-step only);
    mask: bool of ``shape``.  Not both.
    """
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        if len(shape) != 2:
            raise ValueError("lengths applies to per-step predictions [T, B, ...]; "
                             "for per-sequence predictions [B, ...] pass mask [B] instead")
        lengths = np.asarray(lengths)
        T, B = (shape[1], shape[0]) if batch_first else shape
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape [B] = ({B},), got {lengths.shape}")
        if B and (lengths.min() < 0 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in "
                             f"[{lengths.min()}, {lengths.max()}]")
        v = np.arange(T)[:, None] < lengths[None, :]  # [T, B]
        return v.T if batch_first else v
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
        if mask.shape != tuple(shape):
            raise ValueError(f"mask must have the shape of the prediction without its last "
                             f"axis {tuple(shape)}, got {mask.shape}")
        return mask
    return None


def _reduction_arg(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def _pred_arg(name, pred):
    if not isinstance(pred, np.ndarray):
        pred = np.asarray(pred)
    if pred.dtype not in _validate.DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {pred.dtype}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape [T, B, O] (per step) or [B, O] "
                         f"(per sequence), got {pred.shape}")
    return pred


def mse_loss(pred, target, *, lengths=None, mask=None, batch_first=False, reduction="mean"):
    """Squared error: mean (or sum) of (pred - target)^2 over the valid elements.

    pred, target: [T, B, O] ([B, T, O] with ``batch_first``) or [B, O]; same shape.
    lengths / mask select the valid positions (``valid_steps``); invalid ones (any
    values, NaN included) contribute nothing and get gradient 0.  "mean" divides
    by (valid positions) * O, as ``torch.nn.MSELoss`` over the valid elements.

    Returns (loss, dpred).
    """
    pred = _pred_arg("pred", pred)
    _reduction_arg(reduction)
    target = np.asarray(target)
    if target.shape != pred.shape:
        raise ValueError(f"target must have the shape of pred {pred.shape}, got {target.shape}")
    valid = valid_steps(pred.shape[:-1], lengths, mask, batch_first)
    diff = pred - target.astype(pred.dtype, copy=False)
    if valid is None:
        n = diff.size
    else:
        diff = np.where(valid[..., None], diff, 0).astype(pred.dtype, copy=False)
        n = int(valid.sum()) * pred.shape[-1]
    total = float(np.sum(np.square(diff, dtype=np.float64)))
    scale = 1.0 if reduction == "sum" else (1.0 / n if n else 0.0)
    grad = diff * pred.dtype.type(2.0 * scale)
    return total * scale, grad


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits, target, *, lengths=None, mask=None, batch_first=False,
                  reduction="mean"):
    """Softmax cross-entropy, per step or per sequence.

    logits: [T, B, C] ([B, T, C] with ``batch_first``) or [B, C]; target: integer
    class indices of logits' shape without C, in [0, C) at valid positions (invalid
    positions may hold anything).  "mean" averages over the valid positions (as
    ``torch.nn.CrossEntropyLoss``).

    Returns (loss, dlogits); dlogits = (softmax - onehot) / n at valid positions, 0
    elsewhere.
    """
    logits = _pred_arg("logits", logits)
    _reduction_arg(reduction)
    target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {logits.shape[:-1]} (logits without the "
                         f"class axis), got {target.shape}")
    C = logits.shape[-1]
    valid = valid_steps(logits.shape[:-1], lengths, mask, batch_first)
    tgt = target if valid is None else np.where(valid, target, 0)
    if tgt.size and (tgt.min() < 0 or tgt.max() >= C):
        raise ValueError(f"target must lie in [0, C) = [0, {C}) at valid positions, got values "
                         f"in [{tgt.min()}, {tgt.max()}]")
    logp = _log_softmax(logits.astype(np.float64))
    picked = np.take_along_axis(logp, tgt[..., None].astype(np.intp), axis=-1)[..., 0]
    grad = np.exp(logp)
    np.put_along_axis(grad, tgt[..., None].astype(np.intp),
                      np.take_along_axis(grad, tgt[..., None].astype(np.intp), axis=-1) - 1.0,
                      axis=-1)
    if valid is None:
        n = tgt.size
        total = -float(picked.sum())
    else:
        n = int(valid.sum())
        total = -float(picked[valid].sum())
        grad *= valid[..., None]
    scale = 1.0 if reduction == "sum" else (1.0 / n if n else 0.0)
    return total * scale, (grad * scale).astype(logits.dtype)


def accuracy(logits, target, *, lengths=None, mask=None, batch_first=False):
    """Fraction of valid positions where argmax(logits) == target (nan if none)."""
    logits = _pred_arg("logits", logits)
    target = np.asarray(target)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {logits.shape[:-1]}, got {target.shape}")
    hit = logits.argmax(axis=-1) == target
    valid = valid_steps(logits.shape[:-1], lengths, mask, batch_first)
    if valid is not None:
        hit = hit[valid]
    return float(hit.mean()) if hit.size else float("nan")


# --------------------------------------------------------------------------
# Truncated backpropagation through time
# --------------------------------------------------------------------------

class TBPTTResult(NamedTuple):
    loss: float  # the loss of the whole sequence (mean over its valid positions)
    grads: Dict[str, np.ndarray]  # its gradient, truncated at chunk boundaries when cut
    h_n: np.ndarray  # [L*D, B, H] final states, to feed the next call
    c_n: Optional[np.ndarray]


def truncated_bptt(model, x, target, loss, chunk, *, h0=None, c0=None, lengths=None,
                   mask=None, cut=True, batch_first=False, on_chunk=None):
    """Loss and gradient of a long sequence, computed chunk by chunk.

    The sequence is split along time into chunks of ``chunk`` steps (the last may be
    shorter).  Chunk k starts from the final states of chunk k-1 (``h0``/``c0`` for
    the first).  With ``cut=True`` the gradient stops at each chunk boundary
    (truncated BPTT: each chunk is backpropagated, then its cache freed); with
    ``cut=False`` the gradient w.r.t. a chunk's initial state flows into the
    previous chunk, which reproduces the unchunked gradient exactly.

    Args:
        model: ``RNNModel`` (unidirectional: a backward direction needs the future).
        x: [T, B, I] ([B, T, I] with ``batch_first``).
        target: per step, like out ([T, B, ...] or [B, T, ...]) for
            ``output="sequence"``; per row ([B, ...]) for ``output="last"``, where
            only the final chunk has a loss.
        loss: ``mse_loss``, ``cross_entropy`` or any function
            ``loss(pred, target, lengths=, mask=, batch_first=) -> (value, dpred)``
            that averages over valid positions.
        chunk: steps per chunk (>= 1).
        lengths / mask: as ``RNNModel.forward``; per chunk they are sliced, so a row
            that has ended passes its state through later chunks unchanged.
        on_chunk: optional ``on_chunk(grads)`` called after each chunk's backward
            (``cut=True`` only) with the gradient of *that chunk's own mean loss*,
            e.g. to take an optimizer step per chunk (classic TBPTT); later chunks
            then run on the updated parameters.

    Returns ``TBPTTResult(loss, grads, h_n, c_n)``: the loss of the whole sequence
    (each chunk's mean loss weighted by its share of the valid positions) and the
    matching gradient (Σ share · chunk gradient).
    """
    if not isinstance(model, RNNModel):
        raise TypeError(f"model must be an RNNModel, got {type(model).__name__}")
    if model.bidirectional:
        raise ValueError("truncated_bptt needs a unidirectional model: the backward "
                         "direction of a bidirectional layer reads the future")
    chunk = _int_arg("chunk", chunk, 1)
    cut = _bool_arg("cut", cut)
    if on_chunk is not None and not cut:
        raise ValueError("on_chunk needs cut=True (without a cut the chunks form one gradient)")
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    x = _input_arg("x", x, model.dtype, 3, "[B, T, I]" if batch_first else "[T, B, I]")
    tax = 1 if batch_first else 0  # time axis
    T = x.shape[tax]
    B = x.shape[1 - tax]
    if lengths is not None:
        lengths = np.asarray(lengths)
    per_step = model.output == "sequence"

    def tslice(a, t0, t1):
        return a[:, t0:t1] if batch_first else a[t0:t1]

    bounds = [(t0, min(t0 + chunk, T)) for t0 in range(0, T, chunk)] or [(0, 0)]
    # valid positions per chunk (per step) -> each chunk's share of the mean
    if per_step:
        if lengths is not None:
            counts = [int(np.clip(lengths - t0, 0, t1 - t0).sum()) for t0, t1 in bounds]
        elif mask is not None:
            m = np.asarray(mask)
            counts = [int(tslice(m, t0, t1).sum()) for t0, t1 in bounds]
        else:
            counts = [(t1 - t0) * B for t0, t1 in bounds]
        total = sum(counts)
        shares = [c / total if total else 0.0 for c in counts]
    else:
        shares = [0.0] * (len(bounds) - 1) + [1.0]

    grads = {k: np.zeros_like(v) for k, v in model.params.items()}
    value = 0.0
    h, c = h0, c0
    pending = []  # cut=False: (cache, dout) per chunk, backpropagated at the end
    for k, (t0, t1) in enumerate(bounds):
        kw = {}
        if lengths is not None:
            kw["lengths"] = np.clip(lengths - t0, 0, t1 - t0)
        elif mask is not None:
            kw["mask"] = tslice(np.asarray(mask), t0, t1)
        out, h, c, cache = model.forward(tslice(x, t0, t1), h, c, batch_first=batch_first,
                                         training=True, **kw)
        dout = None
        if shares[k] > 0:
            tgt = tslice(np.asarray(target), t0, t1) if per_step else target
            lkw = dict(kw) if per_step else {}
            lv, dout = loss(out, tgt, batch_first=batch_first, **lkw)
            value += shares[k] * lv
        if cut:
            if dout is not None:
                g, _ = model.backward(cache, dout)
                if on_chunk is not None:
                    on_chunk(g)
                for name in grads:
                    grads[name] += shares[k] * g[name]
            del cache
        else:
            pending.append((cache, dout, shares[k]))
    if not cut:
        dh, dc = None, None
        for cache, dout, share in reversed(pending):
            if dout is not None and share != 1.0:
                dout = dout * model.dtype.type(share)
            g, dinp = model.backward(cache, dout, dh, dc)
            dh, dc = dinp["h0"], dinp["c0"]
            for name in grads:
                grads[name] += g[name]
    return TBPTTResult(value, grads, h, c)


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------

def _describe(model):
    if isinstance(model, RNNModel):
        return "RNNModel"
    if isinstance(model, RNN):
        return "RNN"
    raise TypeError(f"model must be an RNN or RNNModel, got {type(model).__name__}")


def save(model, path):
    """Write every parameter of ``model`` and its configuration to an ``.npz`` file."""
    kind = _describe(model)
    meta = json.dumps({"format": FORMAT, "class": kind, "config": model.config()})
    arrays = {name: np.asarray(p) for name, p in model.params.items()}
    arrays[_META_KEY] = np.array(meta)
    with open(os.fspath(path), "wb") as f:  # np.savez would append .npz to a bare name
        np.savez(f, **arrays)


def _read(path):
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError(f"{path}: not an .npz file")
            files = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a fusedrnn model file ({exc})") from None
    if _META_KEY not in files:
        raise ValueError(f"{path}: not a fusedrnn model file (no {_META_KEY!r} entry; "
                         f"write it with fusedrnn.models.save)")
    try:
        meta = json.loads(str(files.pop(_META_KEY)))
    except ValueError:
        raise ValueError(f"{path}: damaged fusedrnn metadata") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, files


def load(model, path):
    """Load parameters saved by ``save`` into ``model`` (in place, cast to its dtype).

    Raises ValueError, naming what differs, when the file holds another class of
    model, another cell, missing or extra parameters, or different shapes.
    """
    kind = _describe(model)
    path = os.fspath(path)
    meta, arrays = _read(path)
    cfg = meta.get("config", {})
    if meta.get("class") != kind:
        raise ValueError(f"{path}: holds an {meta.get('class')}, cannot load it into an {kind}")
    if cfg.get("cell") != model.cell:
        raise ValueError(f"{path}: holds a {cfg.get('cell')!r} model, this model's cell is "
                         f"{model.cell!r}")
    missing = [k for k in model.params if k not in arrays]
    extra = [k for k in arrays if k not in model.params]
    bad = [f"{k}: file {arrays[k].shape}, model {p.shape}" for k, p in model.params.items()
           if k in arrays and arrays[k].shape != p.shape]
    if missing or extra or bad:
        mine = {k: v for k, v in model.config().items() if k != "dtype"}
        theirs = {k: v for k, v in cfg.items() if k != "dtype"}
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        parts = []
        if diff:
            parts.append("configuration differs (file, model): "
                         + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        if missing:
            parts.append("missing in file: " + ", ".join(missing))
        if extra:
            parts.append("not in model: " + ", ".join(extra))
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad))
        raise ValueError(f"{path}: parameters do not fit this model; " + "; ".join(parts))
    for k, p in model.params.items():
        if arrays[k].dtype.kind != "f":
            raise ValueError(f"{path}: parameter {k} has dtype {arrays[k].dtype}, expected floats")
        p[...] = arrays[k]


def load_model(path, *, backend=None, seed=None):
    """Build the model described in a file written by ``save`` and load its parameters."""
    meta, _ = _read(path)
    cfg = dict(meta.get("config", {}))
    kind = meta.get("class")
    if kind == "RNNModel":
        model = RNNModel(cfg.pop("cell"), cfg.pop("input_size"), cfg.pop("hidden_size"),
                         cfg.pop("output_size"), backend=backend, seed=seed, **cfg)
    elif kind == "RNN":
        model = RNN(cfg.pop("cell"), cfg.pop("input_size"), cfg.pop("hidden_size"),
                    backend=backend, seed=seed, **cfg)
    else:
        raise ValueError(f"{os.fspath(path)}: unknown model class {kind!r}")
    load(model, path)
    return model

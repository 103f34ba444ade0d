"""Argument checks shared by the compiled backend and the NumPy reference.

Every public entry point (``fusedrnn.forward``/``backward`` and
``fusedrnn.reference.forward``/``backward``) passes its arguments through
these functions first, so both raise the same errors with the same messages
(DESIGN.md section 4).  Nothing here copies data: arrays come back as given,
and arguments passed as ``None`` come back as zero arrays.

Shape legend: T steps, B batch, I input size, H hidden size, G gates.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

#: cell name -> number of gates G
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1, "gru": 3, "lstm": 4}
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = DTYPES


class ForwardArgs(NamedTuple):
    cell: str
    G: int
    x: np.ndarray  # [T, B, I], or [B, T, I] when batch_first
    w_ih: np.ndarray  # [G*H, I]
    w_hh: np.ndarray  # [G*H, H]
    b_ih: Optional[np.ndarray]  # [G*H] (None only when zeros_for_none=False)
    b_hh: Optional[np.ndarray]  # [G*H] (likewise)
    h0: Optional[np.ndarray]  # [B, H] (likewise)
    c0: Optional[np.ndarray]  # [B, H] for lstm (likewise), else None
    lengths: Optional[np.ndarray]  # int64 [B], values in [0, T]
    mask: Optional[np.ndarray]  # bool [T, B] (time-major, whatever batch_first)
    reverse: bool
    batch_first: bool
    training: bool
    dtype: np.dtype
    T: int
    B: int
    I: int
    H: int
    P: int  # state size: the projection size with w_hr, else H
    w_hr: Optional[np.ndarray]  # [P, H] (lstm with projection), else None
    checkpoint: int  # 0: the cache keeps every step; k > 0: the state every k steps


class BackwardArgs(NamedTuple):
    dy: Optional[np.ndarray]  # same shape and layout as y (None only when zeros_for_none=False)
    dh_n: Optional[np.ndarray]  # [B, H] (likewise)
    dc_n: Optional[np.ndarray]  # [B, H] for lstm, else None


def _flag(name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _array(name, value, dtype, shape, legend):
    """Return ``value`` as an ndarray of ``dtype`` and ``shape`` (no copy).

    ``legend`` names the dimensions for the error message: a string, or a
    callable returning one (so that the common path formats nothing).
    """
    a = value if type(value) is np.ndarray else np.asarray(value)
    if a.dtype is dtype and a.shape == shape:  # the common case, first and fast
        return a
    if a.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {a.dtype} but x has dtype {dtype}; "
            f"all arrays of one call must share x's dtype (float32 or float64)"
        )
    if a.shape != shape:
        legend = legend() if callable(legend) else legend
        raise ValueError(f"{name} must have shape {legend} = {tuple(shape)}, got {a.shape}")
    return a


def _checkpoint(value, T):
    """The checkpoint interval k (0: off) of ``forward(..., checkpoint=value)``."""
    if isinstance(value, (bool, np.bool_)):
        if not value:
            return 0
        return math.isqrt(T - 1) + 1 if T > 1 else 1  # ceil(sqrt(T))
    if not isinstance(value, (int, np.integer)):
        raise TypeError(f"checkpoint must be a bool or a positive int (steps between kept states), "
                        f"got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"checkpoint must be a bool or a positive int (steps between kept states), "
                         f"got {int(value)}")
    return int(value)


def gates_of(cell):
    """The gate count G of ``cell``, or the error naming the cells."""
    if not isinstance(cell, str):
        raise TypeError(f"cell must be a str, one of {sorted(GATES)}, got {type(cell).__name__}")
    if cell not in GATES:
        raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
    return GATES[cell]


def check_lengths(lengths, B, T):
    """lengths as a checked integer array of shape [B] with values in [0, T]."""
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [B] = ({B},), got {lengths.shape}")
    if B and (lengths.min() < 0 or lengths.max() > T):
        bad = lengths[(lengths < 0) | (lengths > T)][0]
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got {int(bad)}")
    return lengths


def check_mask(mask, B, T, batch_first):
    """mask as a checked bool array, time-major [T, B] (a view, transposed
    when given [B, T] with batch_first)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    mlayout, mshape = ("[B, T]", (B, T)) if batch_first else ("[T, B]", (T, B))
    if mask.shape != mshape:
        raise ValueError(f"mask must have shape {mlayout} = {mshape}, got {mask.shape}")
    return mask.T if batch_first else mask


def forward_args(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *,
                 lengths=None, mask=None, reverse=False, batch_first=False,
                 training=True, w_hr=None, checkpoint=False, zeros_for_none=True) -> ForwardArgs:
    """Checked arguments of ``forward``; ``zeros_for_none=False`` keeps None
    for b_ih, b_hh, h0 and c0 (the compiled backend reads None as zeros)."""
    G = GATES.get(cell) if type(cell) is str else None  # the common case, inline
    if G is None:
        G = gates_of(cell)
    reverse = _flag("reverse", reverse)
    batch_first = _flag("batch_first", batch_first)
    training = _flag("training", training)

    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    dtype = x.dtype
    if dtype is not _F32 and dtype is not _F64 and dtype not in DTYPES:
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != 3:
        layout = "[B, T, I]" if batch_first else "[T, B, I]"
        raise ValueError(f"x must have 3 dimensions {layout}, got shape {x.shape}")
    if batch_first:
        B, T, I = x.shape
    else:
        T, B, I = x.shape
    if I < 1:
        raise ValueError(f"x must have input size I >= 1 (last dimension), got shape {x.shape}")
    checkpoint = 0 if checkpoint is False else _checkpoint(checkpoint, T)

    if not isinstance(w_hh, np.ndarray):
        w_hh = np.asarray(w_hh)
    if w_hh.ndim != 2:
        raise ValueError(f"w_hh must have 2 dimensions [G*H, H], got shape {w_hh.shape}")
    if w_hr is None:
        H = P = w_hh.shape[1]
        if H < 1:
            raise ValueError(f"w_hh must have hidden size H >= 1 (second dimension), got shape {w_hh.shape}")
        w_hh = _array("w_hh", w_hh, dtype, (G * H, H),
                      lambda: f"[G*H, H] with G={G} for cell {cell!r}")
    else:
        # LSTM with projection: the state h has P values, the cell c has H.
        if cell != "lstm":
            raise ValueError(f"w_hr (projection) is only used by cell 'lstm', got cell {cell!r}")
        if not isinstance(w_hr, np.ndarray):
            w_hr = np.asarray(w_hr)
        if w_hr.dtype != dtype:
            raise TypeError(f"w_hr has dtype {w_hr.dtype} but x has dtype {dtype}; "
                            f"all arrays of one call must share x's dtype (float32 or float64)")
        if w_hr.ndim != 2 or min(w_hr.shape) < 1:
            raise ValueError(f"w_hr must have shape [P, H] with P, H >= 1, got {w_hr.shape}")
        P, H = w_hr.shape
        w_hh = _array("w_hh", w_hh, dtype, (G * H, P),
                      lambda: f"[4*H, P] with H={H}, P={P} (from w_hr [P, H])")
    GH = G * H
    w_ih = _array("w_ih", w_ih, dtype, (GH, I), lambda: f"[G*H, I] with G={G}, H={H}, I={I}")
    z = zeros_for_none
    if b_ih is not None:
        b_ih = _array("b_ih", b_ih, dtype, (GH,), "[G*H]")
    elif z:
        b_ih = np.zeros(GH, dtype)
    if b_hh is not None:
        b_hh = _array("b_hh", b_hh, dtype, (GH,), "[G*H]")
    elif z:
        b_hh = np.zeros(GH, dtype)
    if h0 is not None:
        h0 = _array("h0", h0, dtype, (B, P), "[B, P]" if w_hr is not None else "[B, H]")
    elif z:
        h0 = np.zeros((B, P), dtype)
    if c0 is not None:
        if cell != "lstm":
            raise ValueError(f"c0 is only used by cell 'lstm', got c0 for cell {cell!r}")
        c0 = _array("c0", c0, dtype, (B, H), "[B, H]")
    elif z and cell == "lstm":
        c0 = np.zeros((B, H), dtype)

    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        lengths = check_lengths(lengths, B, T).astype(np.int64, copy=False)
    if mask is not None:
        mask = check_mask(mask, B, T, batch_first)
    # (tuple.__new__: half the cost of ForwardArgs(...) with this many fields)
    return tuple.__new__(ForwardArgs, (cell, G, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, mask,
                                       reverse, batch_first, training, dtype, T, B, I, H, P, w_hr,
                                       checkpoint))


def backward_args(cache, cache_type, dy, dh_n=None, dc_n=None,
                  zeros_for_none=True) -> BackwardArgs:
    """Check the arguments of ``backward`` against the cache's recorded sizes.

    ``cache`` must expose ``cell``, ``T``, ``B``, ``H``, ``P``, ``dtype`` and
    ``batch_first``. ``zeros_for_none=False`` keeps None arguments as None.
    """
    if cache is None:
        raise TypeError("backward needs the cache returned by forward(..., training=True); "
                        "got None (forward with training=False keeps no cache)")
    if not isinstance(cache, cache_type):
        raise TypeError(f"cache must be a {cache_type.__module__}.{cache_type.__qualname__} "
                        f"from the same module's forward, got {type(cache).__name__}")
    T, B, H, P, dtype = cache.T, cache.B, cache.H, cache.P, np.dtype(cache.dtype)
    n = "P" if P != H else "H"  # the state's size: P with a projection
    yshape, ylegend = (((B, T, P), lambda: f"[B, T, {n}]") if cache.batch_first
                       else ((T, B, P), lambda: f"[T, B, {n}]"))
    z = zeros_for_none
    if dy is not None:
        dy = _array("dy", dy, dtype, yshape, ylegend)
    elif z:
        dy = np.zeros(yshape, dtype)
    if dh_n is not None:
        dh_n = _array("dh_n", dh_n, dtype, (B, P), lambda: f"[B, {n}]")
    elif z:
        dh_n = np.zeros((B, P), dtype)
    if dc_n is not None:
        if cache.cell != "lstm":
            raise ValueError(f"dc_n is only used by cell 'lstm', got dc_n for cell {cache.cell!r}")
        dc_n = _array("dc_n", dc_n, dtype, (B, H), "[B, H]")
    elif z and cache.cell == "lstm":
        dc_n = np.zeros((B, H), dtype)
    return BackwardArgs(dy, dh_n, dc_n)

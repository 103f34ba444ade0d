"""Pure-NumPy reference implementation of fusedrnn's recurrent layers: the test oracle.

Naive on purpose: one Python loop over time, plain NumPy ops per step, every
equation written out.  It shares its API with the compiled backend
(``fusedrnn.forward`` / ``fusedrnn.backward``, shared/DESIGN.md section 3) and
its argument checks (``fusedrnn._validate``), so the two raise the same errors.

Shape legend: T steps, B batch, I input size, H hidden size, G gates
(rnn 1, gru 3, lstm 4).  Time-major: x [T, B, I], y [T, B, H]; with
``batch_first`` x [B, T, I] and y [B, T, H].  Weights (PyTorch layout, so
``torch.nn`` weights load unchanged): w_ih [G*H, I], w_hh [G*H, H],
b_ih [G*H], b_hh [G*H].  Below, ``gx = W_ih x + b_ih`` and ``gh = W_hh h + b_hh``
are the input and recurrent pre-activations of a step, each [B, G*H] and split
into G blocks of H columns in the cell's gate order.

Cells (sigma = logistic sigmoid, * = elementwise product):

- ``rnn_tanh | rnn_relu | rnn_sigmoid``:  h' = act(gx + gh)
- ``lstm`` (gates i, f, g, o)::

      i = sigma(gx_i + gh_i)   f = sigma(gx_f + gh_f)
      g = tanh(gx_g + gh_g)    o = sigma(gx_o + gh_o)
      c' = f * c + i * g       h' = o * tanh(c')

- ``gru`` (gates r, z, n; reset applied after the recurrent product)::

      r = sigma(gx_r + gh_r)   z = sigma(gx_z + gh_z)
      n = tanh(gx_n + r * gh_n)
      h' = (1 - z) * n + z * h

Validity rule (DESIGN.md section 2): step (t, b) is valid when t < lengths[b]
(lengths given), or mask[t, b] (mask given), else always.  Steps run
t = 0 .. T-1, or T-1 .. 0 with ``reverse``.  At an invalid step the state of
row b (h, and c for lstm) is carried unchanged and the cell is not evaluated
for that row at all (so padding or missing inputs may hold anything, NaN
included).  Output y[t, b] is the new h at a valid step; at an invalid step it
is 0 when lengths were given (padding) and the carried h when a mask was given
(missing values).  Gradients follow the same rule: with lengths, dy at padded
positions contributes nothing; with a mask, dy at an invalid step flows into
the carried state, because y there *is* the carried state.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _validate

__all__ = ["forward", "backward", "ReferenceCache"]


# --------------------------------------------------------------------------
# Pointwise helpers
# --------------------------------------------------------------------------

def _sigmoid(v):
    """Logistic sigmoid 1 / (1 + exp(-v)), written as 0.5 * (1 + tanh(v / 2)).

    The tanh form never overflows (``exp(-v)`` does for v < -709 in float64,
    v < -88 in float32) and saturates to exactly 0 or 1, so large
    pre-activations give finite values and zero derivatives without warnings.
    """
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def _relu(v):
    return np.maximum(v, 0)


# Elman activations: name -> (act, derivative expressed through the output y = act(v)).
_ELMAN = {
    "rnn_tanh": (np.tanh, lambda y: 1 - y * y),
    "rnn_relu": (_relu, lambda y: (y > 0).astype(y.dtype)),  # derivative 0 at v = 0, as torch
    "rnn_sigmoid": (_sigmoid, lambda y: y * (1 - y)),
}


def _split(a, parts):
    """Split the last axis of ``a`` [..., parts*H] into ``parts`` blocks of H columns."""
    return np.split(a, parts, axis=-1)


# --------------------------------------------------------------------------
# One step of each cell, forward and backward, on the valid rows only.
#
# forward:  (gx [R, G*H], gh [R, G*H], h [R, H], c [R, H] or None)
#           -> (h' [R, H], c' [R, H] or None, saved: dict of arrays for backward)
# backward: (saved, h [R, H], c, dh' [R, H], dc' [R, H] or None)
#           -> (dgx [R, G*H], dgh [R, G*H], dh_direct [R, H], dc [R, H] or None)
#
# R is the number of valid rows at the step.  dgx / dgh are the gradients with
# respect to the pre-activations gx / gh; dh_direct is the part of dh that does
# not pass through W_hh (the caller adds dgh @ W_hh).
# --------------------------------------------------------------------------

def _elman_forward(cell, gx, gh, h, c):
    act, _ = _ELMAN[cell]
    h_new = act(gx + gh)  # h' = act(gx + gh)
    return h_new, None, {"h_new": h_new}


def _elman_backward(cell, saved, h, c, dh_new, dc_new):
    _, dact = _ELMAN[cell]
    dpre = dh_new * dact(saved["h_new"])  # d(gx + gh) = dh' * act'(.)
    return dpre, dpre, np.zeros_like(h), None


def _lstm_forward(cell, gx, gh, h, c):
    pi, pf, pg, po = _split(gx + gh, 4)
    i, f, g, o = _sigmoid(pi), _sigmoid(pf), np.tanh(pg), _sigmoid(po)
    c_new = f * c + i * g  # c' = f * c + i * g
    tc = np.tanh(c_new)
    h_new = o * tc  # h' = o * tanh(c')
    return h_new, c_new, {"i": i, "f": f, "g": g, "o": o, "tc": tc}


def _lstm_backward(cell, saved, h, c, dh_new, dc_new):
    i, f, g, o, tc = saved["i"], saved["f"], saved["g"], saved["o"], saved["tc"]
    do = dh_new * tc  # dL/do
    dc_tot = dc_new + dh_new * o * (1 - tc * tc)  # dL/dc' through both c' and h'
    di = dc_tot * g
    df = dc_tot * c
    dg = dc_tot * i
    dc_prev = dc_tot * f
    dpre = np.concatenate(
        [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=-1)
    return dpre, dpre, np.zeros_like(h), dc_prev


def _gru_forward(cell, gx, gh, h, c):
    xr, xz, xn = _split(gx, 3)
    hr, hz, hn = _split(gh, 3)
    r = _sigmoid(xr + hr)
    z = _sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)  # n = tanh(gx_n + r * gh_n)
    h_new = (1 - z) * n + z * h  # h' = (1 - z) * n + z * h
    # hn is a view into gh: copy it so the cache holds (and counts) only what it needs
    return h_new, None, {"r": r, "z": z, "n": n, "hn": hn.copy()}


def _gru_backward(cell, saved, h, c, dh_new, dc_new):
    r, z, n, hn = saved["r"], saved["z"], saved["n"], saved["hn"]
    dn_pre = dh_new * (1 - z) * (1 - n * n)  # dL/d(gx_n + r * gh_n)
    dz_pre = dh_new * (h - n) * z * (1 - z)  # dL/d(gx_z + gh_z)
    dr_pre = dn_pre * hn * r * (1 - r)  # dL/d(gx_r + gh_r)
    dgx = np.concatenate([dr_pre, dz_pre, dn_pre], axis=-1)
    dgh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=-1)
    return dgx, dgh, dh_new * z, None


_CELLS = {
    "rnn_tanh": (_elman_forward, _elman_backward),
    "rnn_relu": (_elman_forward, _elman_backward),
    "rnn_sigmoid": (_elman_forward, _elman_backward),
    "lstm": (_lstm_forward, _lstm_backward),
    "gru": (_gru_forward, _gru_backward),
}


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

class _Step(NamedTuple):
    """What backward needs from one executed step (forward order)."""

    t: int  # time index
    rows: np.ndarray  # intp [R]: the batch rows valid at this step
    h: np.ndarray  # [R, H] state before the step
    c: Optional[np.ndarray]  # [R, H] cell state before the step (lstm)
    saved: dict  # cell-specific activations, each [R, H]


class ReferenceCache:
    """Everything ``backward`` needs, owned by the cache (inputs are copied).

    Treat as opaque.  ``backward`` only reads it, so it may be called any
    number of times.  ``nbytes`` is the total size of the arrays held.
    """

    def __init__(self, cell, T, B, I, H, dtype, batch_first, padded, x, w_ih, w_hh, steps,
                 w_hr=None):
        self.cell = cell
        self.T, self.B, self.I, self.H = T, B, I, H
        self.P = H if w_hr is None else w_hr.shape[0]  # state size (projection size)
        self.w_hr = w_hr  # [P, H] copy (lstm with projection), else None
        self.dtype = np.dtype(dtype)
        self.batch_first = batch_first
        self.padded = padded  # lengths were given: dy at invalid steps is ignored
        self.x = x  # [T, B, I] time-major copy
        self.w_ih = w_ih  # [G*H, I] copy
        self.w_hh = w_hh  # [G*H, H] copy
        self.steps = steps  # tuple of _Step, in the order they ran

    @property
    def nbytes(self) -> int:
        arrays = [self.x, self.w_ih, self.w_hh] + ([] if self.w_hr is None else [self.w_hr])
        for s in self.steps:
            arrays += [s.rows, s.h, *s.saved.values()]
            if s.c is not None:
                arrays.append(s.c)
        return int(sum(a.nbytes for a in arrays))

    def __repr__(self):
        return (f"ReferenceCache(cell={self.cell!r}, T={self.T}, B={self.B}, I={self.I}, "
                f"H={self.H}, dtype={self.dtype}, nbytes={self.nbytes})")


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            mask=None, reverse=False, batch_first=False, training=True, w_hr=None,
            checkpoint=False):
    """Run a whole recurrent layer forward.

    Arguments (shapes as in the module docstring; None means zeros):
        cell: 'rnn_tanh', 'rnn_relu', 'rnn_sigmoid', 'lstm' or 'gru'.
        x: [T, B, I] ([B, T, I] with batch_first), float32 or float64; every
            array of the call must share its dtype.
        w_ih [G*H, I], w_hh [G*H, H], b_ih [G*H], b_hh [G*H], h0 [B, H],
        c0 [B, H] (lstm only).
        lengths: integer [B] in [0, T]; or mask: bool [T, B] ([B, T] with
            batch_first).  At most one of them; see the validity rule above.
        reverse: run t = T-1 .. 0.
        training: keep a cache for ``backward``.
        w_hr: [P, H], lstm only: projection (as torch.nn.LSTM's proj_size).
            The state becomes h' = W_hr (o * tanh(c')) with P values; then
            w_hh is [4*H, P], h0, h_n and y hold P values, c0 and c_n H.
        checkpoint: False, True or a positive int; checked as the compiled
            backend checks it, then ignored: the reference always keeps every
            step (its gradients are what a checkpointed backward must give).

    Returns ``(y, h_n, c_n, cache)``: y [T, B, H] ([B, T, H] with
    batch_first), h_n [B, H] the state after each row's last valid step,
    c_n [B, H] for lstm else None, and a ``ReferenceCache`` (None when
    training=False).  All arrays have x's dtype and are freshly allocated.
    """
    a = _validate.forward_args(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths,
                               mask=mask, reverse=reverse, batch_first=batch_first,
                               training=training, w_hr=w_hr, checkpoint=checkpoint)
    T, B, H, P = a.T, a.B, a.H, a.P
    step_forward, _ = _CELLS[a.cell]
    is_lstm = a.cell == "lstm"

    xt = a.x.transpose(1, 0, 2) if a.batch_first else a.x  # [T, B, I]
    valid = _valid_steps(a)  # bool [T, B]
    padded = a.lengths is not None

    h = a.h0.copy()  # [B, H] running state
    c = a.c0.copy() if is_lstm else None
    y = np.zeros((T, B, P), a.dtype)
    steps = []
    for t in _time_order(T, a.reverse):
        rows = np.flatnonzero(valid[t])  # valid rows of this step
        h_prev = h[rows]
        c_prev = c[rows] if is_lstm else None
        gx = xt[t, rows] @ a.w_ih.T + a.b_ih  # [R, G*H]
        gh = h_prev @ a.w_hh.T + a.b_hh  # [R, G*H]
        h_new, c_new, saved = step_forward(a.cell, gx, gh, h_prev, c_prev)
        if a.w_hr is not None:  # projection: h' = W_hr m with m = o * tanh(c')
            saved["m"] = h_new
            h_new = h_new @ a.w_hr.T
        h[rows] = h_new  # invalid rows keep their state
        if is_lstm:
            c[rows] = c_new
        if padded:
            y[t, rows] = h_new  # padding stays 0
        else:
            y[t] = h  # valid rows: new h; masked rows: carried h
        if a.training:
            steps.append(_Step(t, rows, h_prev, c_prev, saved))

    if a.batch_first:
        y = np.ascontiguousarray(y.transpose(1, 0, 2))
    cache = None
    if a.training:
        cache = ReferenceCache(a.cell, T, B, a.I, H, a.dtype, a.batch_first, padded,
                               np.array(xt), a.w_ih.copy(), a.w_hh.copy(), tuple(steps),
                               None if a.w_hr is None else a.w_hr.copy())
    return y, h, c, cache


def backward(cache, dy, dh_n=None, dc_n=None):
    """Backpropagate through time for a ``forward`` call that kept its cache.

    Arguments: the ``cache``; dy, the gradient of the loss with respect to y
    (same shape and layout as y); dh_n [B, H]; dc_n [B, H] (lstm only).  Any
    of them may be None, meaning zeros.  The cache is not modified.

    Returns a dict with the gradients with respect to every argument of
    ``forward``: 'x' (x's shape and layout), 'h0', 'c0' (None unless lstm),
    'w_ih', 'w_hh', 'b_ih', 'b_hh'.  Arguments that were passed to forward as
    None get the gradient with respect to the zeros they stood for (h0/c0: the
    gradient reaching the initial state; biases: their usual sums).

    Walking the executed steps backwards, with dh / dc the gradient reaching
    the running state (initially dh_n / dc_n):

    - dh += dy[t] (with lengths only on the step's valid rows);
    - valid rows: run the cell's backward to get dgx, dgh, then
      dx[t] = dgx W_ih, dh <- dh_direct + dgh W_hh, dc <- dc through f,
      dW_ih += dgx^T x[t], dW_hh += dgh^T h, db_ih += sum dgx, db_hh += sum dgh;
    - invalid rows carry dh / dc unchanged.
    """
    d = _validate.backward_args(cache, ReferenceCache, dy, dh_n, dc_n)
    T, B, H, dtype = cache.T, cache.B, cache.H, cache.dtype
    _, step_backward = _CELLS[cache.cell]
    is_lstm = cache.cell == "lstm"

    dyt = d.dy.transpose(1, 0, 2) if cache.batch_first else d.dy  # [T, B, H]
    dh = np.array(d.dh_n, dtype=dtype)  # [B, H], a copy: caller's array is not touched
    dc = np.array(d.dc_n, dtype=dtype) if is_lstm else None
    dx = np.zeros((T, B, cache.I), dtype)
    dw_ih = np.zeros_like(cache.w_ih)
    dw_hh = np.zeros_like(cache.w_hh)
    db_ih = np.zeros(cache.w_ih.shape[0], dtype)
    db_hh = np.zeros(cache.w_hh.shape[0], dtype)
    dw_hr = None if cache.w_hr is None else np.zeros_like(cache.w_hr)

    for s in reversed(cache.steps):
        rows = s.rows
        if cache.padded:
            dh[rows] += dyt[s.t, rows]  # y at padded positions is the constant 0
        else:
            dh += dyt[s.t]  # masked rows: y is the carried state
        dh_new = dh[rows]
        dc_new = dc[rows] if is_lstm else None
        if cache.w_hr is not None:  # through the projection h' = W_hr m
            dw_hr += dh_new.T @ s.saved["m"]
            dh_new = dh_new @ cache.w_hr  # gradient w.r.t. m
        dgx, dgh, dh_direct, dc_prev = step_backward(cache.cell, s.saved, s.h, s.c,
                                                     dh_new, dc_new)
        x_t = cache.x[s.t, rows]  # [R, I]
        dx[s.t, rows] = dgx @ cache.w_ih
        dh[rows] = dh_direct + dgh @ cache.w_hh
        if is_lstm:
            dc[rows] = dc_prev
        dw_ih += dgx.T @ x_t
        dw_hh += dgh.T @ s.h
        db_ih += dgx.sum(axis=0)
        db_hh += dgh.sum(axis=0)

    if cache.batch_first:
        dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
    return {"x": dx, "h0": dh, "c0": dc, "w_ih": dw_ih, "w_hh": dw_hh,
            "b_ih": db_ih, "b_hh": db_hh, "w_hr": dw_hr}


# --------------------------------------------------------------------------
# Validity rule
# --------------------------------------------------------------------------

def _valid_steps(a) -> np.ndarray:
    """bool [T, B]: which (t, b) steps are valid under the lengths / mask rule."""
    if a.lengths is not None:
        return np.arange(a.T)[:, None] < a.lengths[None, :]
    if a.mask is not None:
        return np.asarray(a.mask, dtype=bool)  # already time-major
    return np.ones((a.T, a.B), dtype=bool)


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)

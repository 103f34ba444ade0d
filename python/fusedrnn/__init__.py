"""fusedrnn: whole recurrent layers (Elman RNN, LSTM, GRU) in one fused C++ call.

    y, h_n, c_n, cache = fusedrnn.forward("lstm", x, w_ih, w_hh, b_ih, b_hh)
    grads = fusedrnn.backward(cache, dy)

``fusedrnn.reference`` has the same functions in plain NumPy (the test oracle).
Shapes, gate orders and the lengths/mask/reverse rule follow PyTorch; see the
README for the contract in brief.
"""

from __future__ import annotations

import os

import numpy as np

from . import _core, _device, _validate, reference
from ._device import DeviceArray

__all__ = ["forward", "backward", "set_num_threads", "get_num_threads", "CELLS", "Cache", "reference",
           "cuda_available", "cuda_status", "DeviceArray", "__version__"]
__version__ = "0.1.0"

#: the cells fusedrnn runs, with their gate counts G
CELLS = dict(_validate.GATES)
Cache = _core.Cache


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            mask=None, reverse=False, batch_first=False, training=True, w_hr=None,
            checkpoint=False):
    """Run one recurrent layer over a whole sequence.

    Args:
        cell: "rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm" or "gru".
        x: [T, B, I] input ([B, T, I] when ``batch_first``), float32 or float64.
        w_ih: [G*H, I]; w_hh: [G*H, H]; b_ih, b_hh: [G*H] or None (zeros).
        h0, c0: [B, H] initial state or None (zeros); c0 only for "lstm".
        lengths: [B] integers in [0, T]; step t of row b runs when t < lengths[b],
            outputs past a row's end are 0.
        mask: [T, B] bool ([B, T] when ``batch_first``); a False step keeps the
            state and outputs the carried state.
        reverse: run t = T-1 ... 0 (with lengths, row b starts at lengths[b]-1).
        training: keep what ``backward`` needs; False returns cache None.
        w_hr: [P, H], lstm only: projection (torch.nn.LSTM's proj_size); the
            state becomes h' = W_hr (o * tanh(c')) with P values, w_hh is
            [4*H, P], and h0, h_n, y hold P values (c0, c_n keep H).
        checkpoint: memory-saving cache for training. False keeps every
            step's state and gates; True keeps only the state every
            ceil(sqrt(T)) steps, an int k every k steps, and ``backward``
            recomputes the steps in between (one more forward pass, same
            gradients up to rounding). See docs/memory.md.

    Arrays on a CUDA device (torch CUDA tensors, CuPy, anything with
    ``__cuda_array_interface__``) run on the CUDA backend when it is built:
    zero-copy, on the caller's stream, results on the same device and of the
    caller's array type; float32, float16 or bfloat16 (docs/cuda.md).

    Returns:
        y [T, B, H] (or [B, T, H]), h_n [B, H], c_n [B, H] or None, cache.
    """
    return _forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, mask=mask,
                    reverse=reverse, batch_first=batch_first, training=training, w_hr=w_hr,
                    checkpoint=checkpoint)


def _forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
             mask=None, reverse=False, batch_first=False, training=True, w_hr=None,
             checkpoint=False, share_weights=False):
    """``forward``; ``share_weights`` (CPU): the cache refers to the weight arrays and holds
    them, instead of copies, so it is only for callers that guarantee the weights do not
    change while the cache lives (fusedrnn.torch's eager training: autograd's check of
    saved tensors refuses a backward after an in-place change, as for torch.nn)."""
    if type(x) is not np.ndarray and _device.is_device_array(x):
        return _device.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, mask=mask,
                               reverse=reverse, batch_first=batch_first, training=training,
                               w_hr=w_hr, checkpoint=checkpoint)
    a = _validate.forward_args(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths,
                               mask=mask, reverse=reverse, batch_first=batch_first,
                               training=training, w_hr=w_hr, checkpoint=checkpoint,
                               zeros_for_none=False)
    return _core.forward(a.cell, a.x, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.h0, a.c0, a.lengths,
                         a.mask, a.reverse, a.batch_first, a.training, a.w_hr, a.checkpoint,
                         share_weights)


def backward(cache, dy, dh_n=None, dc_n=None):
    """Gradients of a loss through ``forward``.

    Args:
        cache: from ``forward(..., training=True)``; may be used several times.
        dy: gradient w.r.t. y (same shape as y), or None for zeros.
        dh_n, dc_n: gradients w.r.t. h_n and c_n ([B, H]) or None (zeros).

    Returns:
        dict with keys x, h0, c0 (None unless lstm), w_ih, w_hh, b_ih, b_hh,
        w_hr (None unless forward had a projection).
    """
    return _backward(cache, dy, dh_n, dc_n)


def _backward(cache, dy, dh_n=None, dc_n=None, need_x=True, need_h0=True, need_c0=True):
    """``backward``; a gradient of x, h0 or c0 that is not wanted (need_*=False) is not
    computed and comes back as None: no dx product, and without dh0 no recurrent product
    for the first step (fusedrnn.torch, for inputs that do not require grad)."""
    if isinstance(cache, _device.DeviceCache):
        return _device.backward(cache, dy, dh_n, dc_n, need_x, need_h0, need_c0)
    d = _validate.backward_args(cache, Cache, dy, dh_n, dc_n, zeros_for_none=False)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _core.backward(
        cache, d.dy, d.dh_n, d.dc_n, need_x, need_h0, need_c0)
    return {"x": dx, "h0": dh0, "c0": dc0, "w_ih": dw_ih, "w_hh": dw_hh, "b_ih": db_ih,
            "b_hh": db_hh, "w_hr": dw_hr}


def cuda_available():
    """Whether the CUDA backend is built and sees a usable device."""
    return _device.available()


def cuda_status():
    """One line on the CUDA backend: built or not, and the devices it sees."""
    return _device.status()


def set_num_threads(n):
    """Set the threads each fusedrnn call uses (default: the cores this process may use)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _core.set_num_threads(n)


def get_num_threads():
    """The threads each fusedrnn call uses."""
    return _core.get_num_threads()


def _default_threads():
    env = os.environ.get("FUSEDRNN_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FUSEDRNN_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FUSEDRNN_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


_core.set_num_threads(_default_threads())

"""fusedrnn's CPU kernels in JAX: glue, no math (``import fusedrnn.jax``; needs jax).

    import fusedrnn.jax as fj
    y, h_n, c_n = fj.rnn("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths)

``rnn`` runs one recurrent layer in one direction over a whole sequence, with the
arguments, shapes and semantics of ``fusedrnn.forward`` (shared/DESIGN.md sections 2
and 3; ``training`` is not an argument: JAX decides). It is a ``jax.custom_vjp``
function whose forward and backward call ``fusedrnn.forward`` / ``fusedrnn.backward``
through ``jax.pure_callback``, so it works eagerly and under ``jax.jit``, ``jax.grad``,
``jax.vjp``, ``jax.value_and_grad`` and ``jax.vmap`` (vmap runs one call per mapped
element). Not supported: forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``)
and differentiating the gradient again, which JAX refuses for custom_vjp functions
and callbacks with its own error.

How the backward finds the forward's cache
------------------------------------------
A differentiated call's forward runs ``fusedrnn.forward(..., training=True)`` and keeps
the cache on the host, in a registry, under a token (two uint32) that travels to the
backward as a residual. The backward takes the cache out of the registry (so memory is
freed as soon as the gradient is computed) and calls ``fusedrnn.backward``. When the
cache is not there - the registry evicted it, or the same residuals are differentiated a
second time - the backward runs the forward again from the residual inputs, which gives
the same gradients (the kernels are deterministic). The registry holds at most
``cache_limit()`` bytes of caches (default 2 GiB, ``set_cache_limit``); the oldest go
first. ``cache_stats()`` counts caches used and recomputed.

Shapes and dtypes are checked when the call is traced, with the messages of
``fusedrnn.forward`` (ValueError/TypeError naming the argument). Values (lengths in
[0, T]) are checked when the kernel runs; JAX then raises its runtime error, whose
message contains fusedrnn's.

Arrays: float32, or float64 with ``jax_enable_x64``; lengths integers, mask bool. The
kernels run on the CPU; arrays on another device are copied to the host and back by
``jax.pure_callback``.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import partial
from typing import NamedTuple, Optional

import numpy as np

import jax
import jax.numpy as jnp

import fusedrnn
from fusedrnn import _validate

__all__ = ["rnn", "set_cache_limit", "cache_limit", "cache_stats"]

#: the differentiable array arguments of ``rnn``, in order
_ARRAYS = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0", "w_hr")


class _Static(NamedTuple):
    """What is fixed when a call is traced: the cell, the flags, the output shapes."""
    cell: str
    reverse: bool
    batch_first: bool
    checkpoint: object
    y_shape: tuple
    state_shape: tuple  # h_n [B, P]
    cell_shape: Optional[tuple]  # c_n [B, H] for lstm, else None
    dtype: np.dtype


def _key(token) -> int:
    """The registry key of a token (two uint32, from _Registry.put)."""
    hi, lo = np.asarray(token).tolist()  # (indexing a jax.Array would run JAX ops)
    return (hi << 32) | lo


class _Registry:
    """Caches of differentiated forwards, by token, at most ``limit`` bytes in all."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._caches: "OrderedDict[int, fusedrnn.Cache]" = OrderedDict()
        self._bytes = 0
        self._next = 1
        self.used = self.recomputed = self.evicted = self.released = 0

    def put(self, cache) -> np.ndarray:
        with self._lock:
            key, self._next = self._next, self._next + 1
            if cache.nbytes <= self.limit:
                self._caches[key] = cache
                self._bytes += cache.nbytes
                self._shrink(self.limit)
            else:
                self.evicted += 1
        return np.array([key >> 32, key & 0xFFFFFFFF], np.uint32)

    def take(self, token):
        key = _key(token)
        with self._lock:
            cache = self._caches.pop(key, None)
            if cache is None:
                self.recomputed += 1
            else:
                self._bytes -= cache.nbytes
                self.used += 1
        return cache

    def release(self, key: int) -> None:
        """Drop the cache of ``key`` if it is still held: its residuals are gone."""
        with self._lock:
            cache = self._caches.pop(key, None)
            if cache is not None:
                self._bytes -= cache.nbytes
                self.released += 1

    def _shrink(self, limit: int) -> None:
        while self._bytes > limit:
            _, old = self._caches.popitem(last=False)
            self._bytes -= old.nbytes
            self.evicted += 1

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = limit
            self._shrink(limit)

    def stats(self) -> dict:
        with self._lock:
            return {"held": len(self._caches), "held_bytes": self._bytes, "limit": self.limit,
                    "used": self.used, "recomputed": self.recomputed, "evicted": self.evicted,
                    "released": self.released}


_registry = _Registry(2 << 30)


def set_cache_limit(nbytes: int) -> None:
    """Hold at most ``nbytes`` of forward caches between a differentiated call's forward
    and its backward (default 2 GiB). Caches that do not fit make the backward run the
    forward again: the same gradients, one more forward pass. 0 keeps none."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {int(nbytes)}")
    _registry.set_limit(int(nbytes))


def cache_limit() -> int:
    """The bytes of forward caches held at most (``set_cache_limit``)."""
    return _registry.limit


def cache_stats() -> dict:
    """The registry of forward caches: ``held`` caches (``held_bytes``) waiting for their
    backward, ``limit``, and since import the caches ``used`` by a backward, the
    backwards that ``recomputed`` their forward, the caches ``evicted`` (or never kept)
    for the limit, and those ``released`` because their residuals were dropped unused
    (eager calls only)."""
    return _registry.stats()


def _placeholder(a):
    """A zero array of ``a``'s shape and dtype that takes no memory (for the checks)."""
    return None if a is None else np.broadcast_to(np.zeros((), a.dtype), a.shape)


def _run_forward(static: _Static, arrays, lengths, mask, training: bool):
    kw = dict(zip(_ARRAYS, arrays))
    return fusedrnn.forward(
        static.cell, kw["x"], kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"], kw["h0"], kw["c0"],
        lengths=lengths, mask=mask, reverse=static.reverse, batch_first=static.batch_first,
        training=training, w_hr=kw["w_hr"], checkpoint=static.checkpoint if training else False)


def _host_forward(static: _Static, training: bool):
    def run(arrays, lengths, mask):
        y, h_n, c_n, cache = _run_forward(static, arrays, lengths, mask, training)
        out = (y, h_n) if c_n is None else (y, h_n, c_n)
        return out + (_registry.put(cache),) if training else out
    return run


def _host_backward(static: _Static):
    def run(token, arrays, lengths, mask, dy, dh_n, dc_n):
        cache = _registry.take(token)
        if cache is None:  # evicted, or these residuals differentiated before
            cache = _run_forward(static, arrays, lengths, mask, True)[3]
        g = fusedrnn.backward(cache, dy, dh_n, dc_n)
        return tuple(None if a is None else g[name] for name, a in zip(_ARRAYS, arrays))
    return run


def _out_types(static: _Static):
    sd = lambda shape: jax.ShapeDtypeStruct(shape, static.dtype)
    out = (sd(static.y_shape), sd(static.state_shape))
    return out if static.cell_shape is None else out + (sd(static.cell_shape),)


def _with_none(static: _Static, out):
    return (out[0], out[1], None) if static.cell_shape is None else tuple(out)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer(static, arrays, lengths, mask):
    out = jax.pure_callback(_host_forward(static, False), _out_types(static), arrays, lengths,
                            mask, vmap_method="sequential")
    return _with_none(static, out)


def _layer_fwd(static, arrays, lengths, mask):
    token = jax.ShapeDtypeStruct((2,), np.uint32)
    out = jax.pure_callback(_host_forward(static, True), _out_types(static) + (token,), arrays,
                            lengths, mask, vmap_method="sequential")
    token = out[-1]
    if not isinstance(token, jax.core.Tracer):
        # Eager: the token is an array that only this call's residuals hold. When it
        # goes unused (a vjp function dropped, a forward that jax.checkpoint runs
        # again), its cache goes with it.
        weakref.finalize(token, _registry.release, _key(token))
    return _with_none(static, out[:-1]), (token, arrays, lengths, mask)


def _layer_bwd(static, res, cts):
    token, arrays, lengths, mask = res
    dy, dh_n, dc_n = cts
    grad_types = tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
                       for a in arrays)
    grads = jax.pure_callback(_host_backward(static), grad_types, token, arrays, lengths, mask,
                              dy, dh_n, dc_n, vmap_method="sequential")
    return grads, None, None


_layer.defvjp(_layer_fwd, _layer_bwd)


def rnn(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None, mask=None,
        reverse=False, batch_first=False, w_hr=None, checkpoint=False):
    """One recurrent layer over a whole sequence, differentiable in JAX.

    The arguments of ``fusedrnn.forward`` (see its docstring and shared/DESIGN.md),
    as JAX arrays or anything ``jnp.asarray`` takes, without ``training``: a call that
    JAX differentiates keeps the cache for its backward (``checkpoint`` makes that
    cache smaller, as in ``fusedrnn.forward``), any other call keeps none.

    Returns:
        (y, h_n, c_n): y [T, B, H] (or [B, T, H]), h_n [B, H], c_n [B, H] for "lstm",
        else None; H is P with a projection (``w_hr``). Gradients flow to x, w_ih,
        w_hh, b_ih, b_hh, h0, c0 and w_hr; lengths and mask get none.
    """
    as_array = lambda a: None if a is None else jnp.asarray(a)
    arrays = tuple(as_array(a) for a in (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr))
    lengths, mask = as_array(lengths), as_array(mask)
    # shapes and dtypes checked now, with fusedrnn.forward's messages
    a = _validate.forward_args(cell, *(_placeholder(v) for v in arrays[:7]),
                               lengths=_placeholder(lengths), mask=_placeholder(mask),
                               reverse=reverse, batch_first=batch_first,
                               w_hr=_placeholder(arrays[7]), checkpoint=checkpoint,
                               zeros_for_none=False)
    T, B, P = a.T, a.B, a.P
    static = _Static(a.cell, a.reverse, a.batch_first, checkpoint,
                     (B, T, P) if a.batch_first else (T, B, P), (B, P),
                     (B, a.H) if a.cell == "lstm" else None, a.dtype)
    return _layer(static, arrays, lengths, mask)

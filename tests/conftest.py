"""Shared helpers for fusedrnn's tests: random problems and scale-relative errors."""

import zlib

import numpy as np
import pytest

import fusedrnn

CELLS = list(fusedrnn.CELLS)
#: DESIGN.md section 7: compiled vs reference, relative to the result's scale
TOL = {np.float32: 1e-4, np.float64: 1e-10}
GRAD_KEYS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

#: the variable-length / missing-data / direction options every cell is tested with
SEMANTICS = {
    "plain": {},
    "lengths": {"lengths": True},
    "mask": {"mask": True},
    "reverse": {"reverse": True},
    "reverse_lengths": {"reverse": True, "lengths": True},
    "reverse_mask": {"reverse": True, "mask": True},
    "no_h0": {"no_state": True},
    "batch_first_lengths": {"batch_first": True, "lengths": True},
    "batch_first_mask": {"batch_first": True, "mask": True},
}


def make_problem(cell, T, B, I, H, dtype, rng, lengths=False, mask=False, reverse=False,
                 batch_first=False, no_state=False, scale=0.5, proj=0):
    """Random inputs for one call of ``forward``: (args, kwargs, dy, dh_n, dc_n).

    proj=P > 0 (lstm): a projection w_hr [P, H]; the state then has P values.
    """
    G = fusedrnn.CELLS[cell]
    r = lambda *shape: (rng.standard_normal(shape) * scale).astype(dtype)  # noqa: E731
    P = proj or H
    x = r(B, T, I) if batch_first else r(T, B, I)
    args = [cell, x, r(G * H, I), r(G * H, P), r(G * H), r(G * H)]
    if no_state:
        args += [None, None]
    else:
        args += [r(B, P), r(B, H) if cell == "lstm" else None]
    kw = {"reverse": reverse, "batch_first": batch_first}
    if proj:
        kw["w_hr"] = r(P, H)
    if lengths:
        lens = rng.integers(0, T + 1, size=B)
        if B >= 2:  # always include an empty and a full row
            lens[0], lens[-1] = T, 0
        kw["lengths"] = lens
    if mask:
        m = rng.random((B, T) if batch_first else (T, B)) < 0.7
        kw["mask"] = m
    dy = r(B, T, P) if batch_first else r(T, B, P)
    return args, kw, dy, r(B, P), (r(B, H) if cell == "lstm" else None)


def valid_steps(kw, T, B):
    """Which steps (t, b) run, time-major [T, B] (DESIGN.md section 2), for forward's
    keyword arguments: t < lengths[b], else the mask (given [B, T] with batch_first),
    else every step."""
    if kw.get("lengths") is not None:
        return np.arange(T)[:, None] < np.asarray(kw["lengths"])[None, :]
    if kw.get("mask") is not None:
        mask = np.asarray(kw["mask"])
        return mask.T if kw.get("batch_first") else mask
    return np.ones((T, B), bool)


#: (need_x, need_h0, need_c0) of fusedrnn._backward: each gradient left out alone, and all
NEEDS = ((False, True, True), (True, False, True), (True, True, False), (False, False, False))


def assert_wanted_gradients(g, full, need, keys, label="", host=lambda a: a):
    """g from fusedrnn._backward(..., *need) against full, a backward that computed them
    all: None for the gradients of x, h0, c0 not wanted (and where full has none), every
    other one bitwise full's (host: g's arrays as NumPy arrays)."""
    skipped = {k for k, n in zip(("x", "h0", "c0"), need) if not n}
    for k in keys:
        if k in skipped or full[k] is None:
            assert g[k] is None, f"{label} need={need} {k}"
        else:
            np.testing.assert_array_equal(host(g[k]), full[k], err_msg=f"{label} need={need} {k}")


def padded(n):
    """n rounded up to whole float32 vectors of the kernels in use (Ĥ, P̂ of
    docs/memory.md)."""
    lanes = {"avx512": 16, "avx2": 8, "generic": 4}[fusedrnn._core.isa()]
    return -(-n // lanes) * lanes


def rel_err(a, ref):
    """max |a - ref| / max |ref| (0 when both are empty or all zero)."""
    if a is None or ref is None:
        assert a is None and ref is None
        return 0.0
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    diff = np.max(np.abs(a - ref))
    scale = np.max(np.abs(ref))
    if diff == 0:
        return 0.0
    return float(diff / scale) if scale > 0 else float("inf")


def assert_close(name, a, ref, tol):
    err = rel_err(a, ref)
    absdiff = 0.0 if a is None or np.size(a) == 0 else float(np.max(np.abs(np.asarray(a, np.float64) - ref)))
    print(f"{name:>8}: max abs diff {absdiff:.3e}, relative to scale {err:.3e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


@pytest.fixture
def rng(request):
    # A seed per test, stable across runs.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)

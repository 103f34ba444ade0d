"""The memory-saving (checkpointed) training cache: forward(..., checkpoint=k).

The cache keeps the state every k steps; backward recomputes each segment's
steps from its checkpoint. Forward outputs are bitwise those of the full cache;
gradients equal the full cache's up to rounding (the weight gradients are
summed segment by segment) and match the reference within DESIGN.md section 7.
"""

import math

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _core, reference

from conftest import GRAD_KEYS, SEMANTICS, TOL, assert_close, make_problem, padded, rel_err

CASES = [(cell, 0) for cell in fusedrnn.CELLS] + [("lstm", 3)]


def run(args, kw, dy, dh_n, dc_n, **extra):
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw, **extra)
    return (y, h_n, c_n), cache, fusedrnn.backward(cache, dy, dh_n, dc_n)


@pytest.mark.parametrize("cell,proj", CASES)
@pytest.mark.parametrize("sem", list(SEMANTICS))
@pytest.mark.parametrize("k", [1, 2, 3, True, 50])
def test_same_results_as_full_cache(cell, proj, sem, k):
    T, B, I, H = 10, 5, 4, 9
    rng = np.random.default_rng([T, len(sem), len(cell), proj])
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, np.float64, rng, proj=proj,
                                            **SEMANTICS[sem])
    out, full, g = run(args, kw, dy, dh_n, dc_n)
    out_k, ck, g_k = run(args, kw, dy, dh_n, dc_n, checkpoint=k)
    assert ck.checkpoint == (4 if k is True else k) and full.checkpoint == 0
    for a, b in zip(out, out_k):
        assert (a is None and b is None) or np.array_equal(a, b)
    for key in GRAD_KEYS:
        assert rel_err(g_k[key], g[key]) <= 1e-13, key
    # and against the oracle
    ref = reference.forward(*args, **kw, checkpoint=k)
    rg = reference.backward(ref[3], dy, dh_n, dc_n)
    for key in GRAD_KEYS:
        assert_close(key, g_k[key], rg[key], TOL[np.float64])


@pytest.mark.parametrize("cell,proj", CASES)
def test_float32_against_reference(cell, proj):
    T, B, I, H = 37, 6, 19, 21
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, np.float32,
                                            np.random.default_rng(3), lengths=True, proj=proj)
    _, cache, g = run(args, kw, dy, dh_n, dc_n, checkpoint=True)
    assert cache.checkpoint == 7
    a64 = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args]
    kw64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32
                else v) for k, v in kw.items()}
    ref = reference.forward(*a64, **kw64)
    rg = reference.backward(ref[3], dy.astype(np.float64), dh_n.astype(np.float64),
                            None if dc_n is None else dc_n.astype(np.float64))
    for key in GRAD_KEYS:
        assert_close(key, g[key], rg[key], TOL[np.float32])


@pytest.mark.parametrize("cell,proj", [("gru", 0), ("lstm", 0), ("lstm", 5)])
def test_bitwise_across_threads_and_calls(cell, proj):
    args, kw, dy, dh_n, dc_n = make_problem(cell, 40, 9, 24, 40, np.float32,
                                            np.random.default_rng(4), mask=True, proj=proj)
    old = fusedrnn.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 2):
            fusedrnn.set_num_threads(n)
            results.append(run(args, kw, dy, dh_n, dc_n, checkpoint=6))
    finally:
        fusedrnn.set_num_threads(old)
    _, cache, g0 = results[0]
    again = fusedrnn.backward(cache, dy, dh_n, dc_n)  # backward twice on one cache
    for _, _, g in results[1:] + [(None, None, again)]:
        for key in GRAD_KEYS:
            assert (g[key] is None and g0[key] is None) or np.array_equal(g[key], g0[key]), key


def test_empty_and_tiny():
    for T, B in ((0, 3), (4, 0), (1, 1)):
        args, kw, dy, dh_n, dc_n = make_problem("lstm", T, B, 3, 5, np.float64,
                                                np.random.default_rng(5))
        out, _, g = run(args, kw, dy, dh_n, dc_n)
        out_k, ck, g_k = run(args, kw, dy, dh_n, dc_n, checkpoint=True)
        for key in GRAD_KEYS:
            assert rel_err(g_k[key], g[key]) <= 1e-13, (T, B, key)
    # every row of length 0: no step runs, nothing is checkpointed
    args, kw, dy, dh_n, dc_n = make_problem("gru", 6, 3, 3, 5, np.float64,
                                            np.random.default_rng(6))
    kw["lengths"] = np.zeros(3, np.int64)
    _, _, g = run(args, kw, dy, dh_n, dc_n, checkpoint=2)
    assert not g["w_ih"].any() and not g["b_hh"].any()
    np.testing.assert_array_equal(g["h0"], dh_n)


@pytest.mark.parametrize("value,err", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                       ("2", TypeError), (None, TypeError)])
def test_bad_checkpoint(value, err):
    args, kw, *_ = make_problem("rnn_tanh", 3, 2, 2, 3, np.float64, np.random.default_rng(7))
    for api in (fusedrnn, reference):
        with pytest.raises(err, match="checkpoint"):
            api.forward(*args, **kw, checkpoint=value)


def test_numpy_integer_and_inference():
    args, kw, *_ = make_problem("gru", 5, 2, 3, 4, np.float32, np.random.default_rng(8))
    assert fusedrnn.forward(*args, **kw, checkpoint=np.int64(2))[3].checkpoint == 2
    # training=False keeps no cache whatever checkpoint says
    assert fusedrnn.forward(*args, **kw, training=False, checkpoint=True)[3] is None


@pytest.mark.parametrize("cell,proj", CASES)
def test_cache_size_formula(cell, proj):
    """Checkpointed cache.nbytes = itemsize * (N*I + S*B*(Pp + Hp*[lstm]) + G*Hp*I + G*H*P
    + P*H*[proj] + G*Hp + Hp*[gru]) + bookkeeping, S = ceil(steps / k) (docs/memory.md)."""
    T, B, I, H, k = 23, 5, 7, 13, 4
    args, kw, *_ = make_problem(cell, T, B, I, H, np.float32, np.random.default_rng(9),
                                lengths=True, proj=proj)
    cache = fusedrnn.forward(*args, **kw, checkpoint=k)[3]
    N, steps = int(np.sum(kw["lengths"])), int(np.max(kw["lengths"]))
    G, P = fusedrnn.CELLS[cell], proj or H
    Hp, Pp, S = padded(H), padded(P), math.ceil(steps / k)
    floats = (N * I + S * B * (Pp + (Hp if cell == "lstm" else 0)) + G * Hp * I + G * H * P
              + (P * H if proj else 0) + G * Hp + (Hp if cell == "gru" else 0))
    bookkeeping = 8 * (B + 2 * T)
    assert cache.nbytes == 4 * floats + bookkeeping


def _peaks(cell, T, B, H, checkpoint):
    """(cache bytes, forward peak, backward peak) of fusedrnn's working memory."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, H, H, np.float32,
                                            np.random.default_rng(10))
    base = _core.workspace_in_use_bytes()
    _core.workspace_reset_peak()
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw, checkpoint=checkpoint)
    fwd = _core.workspace_peak_bytes() - base
    _core.workspace_reset_peak()
    fusedrnn.backward(cache, dy, dh_n, dc_n)
    bwd = _core.workspace_peak_bytes() - base
    return cache.nbytes, fwd, bwd


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_inference_memory_with_tiled_input(cell):
    """An inference forward keeps the pre-activations of all N rows (N*G*Hp values)
    with BLAS's input projection, of one chunk of steps with the tiled one (chunks of
    2 steps forced here), plus the packed W_ih (docs/memory.md)."""
    T, B, H = 400, 16, 64
    G, N, item = fusedrnn.CELLS[cell], T * B, 4
    args, kw, *_ = make_problem(cell, T, B, H, H, np.float32, np.random.default_rng(11))
    peaks = {}
    try:
        for mode in (0, 1):
            _core._set_tiled_input(mode, 2)
            base = _core.workspace_in_use_bytes()
            _core.workspace_reset_peak()
            fusedrnn.forward(*args, **kw, training=False)
            peaks[mode] = _core.workspace_peak_bytes() - base
    finally:
        _core._set_tiled_input(-1, 0)
    panels = item * G * H * (H + H)  # W_hh, and W_ih when tiled
    assert item * N * G * H <= peaks[0] <= 1.05 * item * N * G * H + panels + (64 << 10)
    assert peaks[1] <= item * 2 * B * G * H + panels + (64 << 10)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_working_memory_formula(cell):
    """Peak working memory follows the formulas of docs/memory.md (within 5% + 64 KiB of
    small buffers), and checkpointing cuts the cache and both peaks by the expected factor."""
    T, B, H = 400, 16, 64
    G, E = fusedrnn.CELLS[cell], {"lstm": 2, "gru": 1}[cell]
    N, k = T * B, 20
    item = 4
    full_cache, full_fwd, full_bwd = _peaks(cell, T, B, H, False)
    ck_cache, ck_fwd, ck_bwd = _peaks(cell, T, B, H, True)
    # full: cache N*(I + H + G*H + E*H); backward adds dgates N*G*H (x2 for gru)
    assert full_cache >= item * N * (H + H + G * H + E * H)
    dgates = item * N * G * H * (2 if cell == "gru" else 1)
    assert full_cache + dgates <= full_bwd <= 1.05 * (full_cache + dgates) + (512 << 10)
    # checkpointed: backward adds one segment's recomputed values and gradients
    seg = k * B
    extra = item * seg * (H + G * H + E * H + G * H * (2 if cell == "gru" else 1))
    assert ck_cache + extra <= ck_bwd <= 1.05 * (ck_cache + extra) + (512 << 10)
    assert ck_fwd <= 1.05 * ck_cache + item * seg * G * H + (512 << 10)
    assert ck_cache < full_cache / 3 and ck_bwd < full_bwd / 3

"""The compiled backend against the NumPy reference (DESIGN.md section 7)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedrnn
from fusedrnn import reference

from conftest import CELLS, GRAD_KEYS, SEMANTICS, TOL, assert_close, make_problem, valid_steps


def run_both(args, kw, dy, dh_n, dc_n):
    out = {}
    for name, mod in (("compiled", fusedrnn), ("reference", reference)):
        y, h_n, c_n, cache = mod.forward(*args, **kw)
        grads = mod.backward(cache, dy, dh_n, dc_n)
        out[name] = (y, h_n, c_n, cache, grads)
    return out["compiled"], out["reference"]


def check_against_reference(args, kw, dy, dh_n, dc_n, tol):
    (y, h_n, c_n, cache, g), (ry, rh_n, rc_n, _, rg) = run_both(args, kw, dy, dh_n, dc_n)
    dtype = args[1].dtype
    for name, a, r in (("y", y, ry), ("h_n", h_n, rh_n), ("c_n", c_n, rc_n)):
        if r is not None:
            assert a.dtype == dtype and a.shape == r.shape
        assert_close(name, a, r, tol)
    assert set(g) == set(GRAD_KEYS)
    for k in GRAD_KEYS:
        if rg[k] is not None:
            assert g[k].dtype == dtype and g[k].shape == rg[k].shape
        assert_close("d" + k, g[k], rg[k], tol)
    return cache


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("semantics", list(SEMANTICS))
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference(cell, semantics, dtype, rng):
    problem = make_problem(cell, 7, 5, 6, 9, dtype, rng, **SEMANTICS[semantics])
    cache = check_against_reference(*problem, tol=TOL[dtype])
    assert cache.nbytes > 0


@pytest.mark.parametrize("cell", CELLS)
def test_larger_shapes(cell, rng):
    """Sizes past the SIMD widths and the BLAS blocking."""
    for semantics in ("plain", "reverse_lengths"):
        problem = make_problem(cell, 12, 19, 70, 65, np.float64, rng, **SEMANTICS[semantics])
        check_against_reference(*problem, tol=TOL[np.float64])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cell=st.sampled_from(CELLS),
    T=st.sampled_from([0, 1, 2, 5]),
    B=st.sampled_from([0, 1, 2, 3]),
    I=st.sampled_from([1, 2, 5, 17]),
    H=st.sampled_from([1, 3, 17, 33]),
    semantics=st.sampled_from(list(SEMANTICS)),
    f32=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_odd_shapes(cell, T, B, I, H, semantics, f32, seed):
    dtype = np.float32 if f32 else np.float64
    problem = make_problem(cell, T, B, I, H, dtype, np.random.default_rng(seed),
                           **SEMANTICS[semantics])
    check_against_reference(*problem, tol=TOL[dtype])


@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_training(cell, rng):
    args, kw, *_ = make_problem(cell, 6, 4, 3, 5, np.float64, rng, lengths=True)
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    y2, h_n2, c_n2, cache2 = fusedrnn.forward(*args, **kw, training=False)
    assert cache2 is None and cache is not None
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(h_n, h_n2)
    if c_n is not None:
        np.testing.assert_array_equal(c_n, c_n2)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_twice_and_deterministic(cell, rng):
    args, kw, dy, dh_n, dc_n = make_problem(cell, 9, 6, 5, 8, np.float32, rng, lengths=True)
    y, h_n, _, cache = fusedrnn.forward(*args, **kw)
    g1 = fusedrnn.backward(cache, dy, dh_n, dc_n)
    g2 = fusedrnn.backward(cache, dy, dh_n, dc_n)
    y_again, h_again, _, cache_again = fusedrnn.forward(*args, **kw)
    g3 = fusedrnn.backward(cache_again, dy, dh_n, dc_n)
    np.testing.assert_array_equal(y, y_again)
    np.testing.assert_array_equal(h_n, h_again)
    for k in GRAD_KEYS:
        if g1[k] is not None:
            np.testing.assert_array_equal(g1[k], g2[k])
            np.testing.assert_array_equal(g1[k], g3[k])


def test_cache_independent_of_caller_arrays(rng):
    """Changing the arrays after forward does not change what backward computes."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 5, 3, 4, 6, np.float64, rng)
    _, _, _, cache = fusedrnn.forward(*args, **kw)
    before = fusedrnn.backward(cache, dy, dh_n, dc_n)
    for a in args[1:]:
        if isinstance(a, np.ndarray):
            a[...] = 7.0
    after = fusedrnn.backward(cache, dy, dh_n, dc_n)
    for k in GRAD_KEYS:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_skip_padding(cell, rng):
    """Outputs past a row's end are exactly 0; a length-0 row returns h0 (and c0)."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, 6, 4, 3, 5, np.float64, rng, lengths=True)
    kw["lengths"] = np.array([6, 2, 0, 4])
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    for b, n in enumerate(kw["lengths"]):
        assert np.all(y[n:, b] == 0)
        if n:
            np.testing.assert_array_equal(h_n[b], y[n - 1, b])
    np.testing.assert_array_equal(h_n[2], args[6][2])
    if c_n is not None:
        np.testing.assert_array_equal(c_n[2], args[7][2])
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    assert np.all(g["x"][:, 2] == 0) and np.all(g["x"][2:, 1] == 0)
    np.testing.assert_array_equal(g["h0"][2], dh_n[2])


def test_float32_close_to_float64(rng):
    """float32 compiled results stay within DESIGN.md's float32 tolerance of float64 ones."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 50, 4, 16, 32, np.float64, rng, lengths=True)
    args32 = [a.astype(np.float32) if isinstance(a, np.ndarray) else a for a in args]
    y64, h64, c64, cache64 = fusedrnn.forward(*args, **kw)
    y32, h32, c32, cache32 = fusedrnn.forward(*args32, **kw)
    assert_close("y", y32, y64, 1e-4)
    g64 = fusedrnn.backward(cache64, dy, dh_n, dc_n)
    g32 = fusedrnn.backward(cache32, dy.astype(np.float32), dh_n.astype(np.float32),
                            dc_n.astype(np.float32))
    for k in GRAD_KEYS:
        assert_close("d" + k, g32[k], g64[k], 1e-4)


@pytest.mark.parametrize("semantics", ["lengths", "mask", "reverse_mask", "batch_first_mask"])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_missing_steps_reaches_nothing(cell, semantics, rng):
    """Padding or missing inputs may hold anything, NaN included (the cell is not run there)."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, 6, 4, 3, 5, np.float64, rng,
                                            **SEMANTICS[semantics])
    x = args[1].copy()
    bf = kw["batch_first"]
    valid = valid_steps(kw, 6, 4)
    (x.transpose(1, 0, 2) if bf else x)[~valid] = np.nan
    args[1] = x
    check_against_reference(args, kw, dy, dh_n, dc_n, TOL[np.float64])
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    assert np.isfinite(y).all() and np.isfinite(h_n).all()
    for k in GRAD_KEYS:
        assert g[k] is None or np.isfinite(g[k]).all(), k

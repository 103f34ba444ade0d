"""Fuzzing the public API: any argument mix either works or raises ValueError/TypeError.

Both backends must agree on which: when the compiled call succeeds, so does the
reference, with the same results; when one raises, the other raises the same
type. FUSEDRNN_FUZZ_EXAMPLES raises the example count for a longer run.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedrnn
from fusedrnn import reference

from conftest import TOL, rel_err

EXAMPLES = int(os.environ.get("FUSEDRNN_FUZZ_EXAMPLES", "300"))
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.bool_]


@st.composite
def calls(draw):
    """A forward call whose arguments are mostly, but not always, consistent."""
    cell = draw(st.sampled_from(list(fusedrnn.CELLS) + ["lstm", "gru", "bogus"]))
    G = fusedrnn.CELLS.get(cell, 1)
    T, B, I, H = (draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 4)),
                  draw(st.integers(0, 4)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    wrong = draw(st.sampled_from(["none", "shape", "dtype", "rank"]))
    target = draw(st.sampled_from(["x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    shapes = {"x": (T, B, I), "w_ih": (G * H, I), "w_hh": (G * H, H), "b_ih": (G * H,),
              "b_hh": (G * H,), "h0": (B, H), "c0": (B, H)}
    args = {}
    for name, shape in shapes.items():
        if name in ("b_ih", "b_hh", "h0", "c0") and draw(st.booleans()):
            args[name] = None
            continue
        shp, dt = shape, dtype
        if name == target and wrong == "shape":
            shp = tuple(s + draw(st.sampled_from([-1, 1])) for s in shape)
            shp = tuple(max(s, 0) for s in shp)
        if name == target and wrong == "rank":
            shp = shape + (1,)
        if name == target and wrong == "dtype":
            dt = draw(st.sampled_from(DTYPES))
        args[name] = (rng.standard_normal(shp) * 0.5).astype(dt)
    kw = {"reverse": draw(st.booleans()), "training": True}
    extra = draw(st.sampled_from(["none", "lengths", "mask", "bad_lengths", "both"]))
    if extra in ("lengths", "both"):
        kw["lengths"] = rng.integers(0, T + 1, size=B)
    if extra == "bad_lengths":
        kw["lengths"] = rng.integers(-2, T + 3, size=B + draw(st.integers(0, 1)))
    if extra in ("mask", "both"):
        kw["mask"] = rng.random((T, B)) < 0.6
    return cell, args, kw


def _run(mod, cell, args, kw):
    try:
        out = mod.forward(cell, args["x"], args["w_ih"], args["w_hh"], args["b_ih"],
                          args["b_hh"], args["h0"], args["c0"], **kw)
    except (ValueError, TypeError) as e:
        assert str(e), "an error message must say what is wrong"
        return type(e), None
    y, h_n, c_n, cache = out
    grads = mod.backward(cache, np.ones_like(y), np.ones_like(h_n),
                         None if c_n is None else np.ones_like(c_n))
    return None, (y, h_n, c_n, grads)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(calls())
def test_forward_fuzz(call):
    cell, args, kw = call
    err_c, out_c = _run(fusedrnn, cell, args, kw)
    err_r, out_r = _run(reference, cell, args, kw)
    assert err_c == err_r, (err_c, err_r)
    if out_c is None:
        return
    tol = TOL[args["x"].dtype.type]
    for a, b in zip(out_c[:3], out_r[:3]):
        assert rel_err(a, b) <= tol
    for k, g in out_c[3].items():
        assert rel_err(g, out_r[3][k]) <= tol, k


@pytest.mark.parametrize("bad", [None, "cache", 3, object()])
def test_backward_rejects_non_caches(bad):
    with pytest.raises(TypeError, match="cache"):
        fusedrnn.backward(bad, np.zeros((1, 1, 1)))

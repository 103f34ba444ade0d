"""fusedrnn.jax: one recurrent layer as a differentiable JAX function.

The adapter has no math of its own, so its outputs and gradients must be bitwise
those of fusedrnn.forward / fusedrnn.backward on the same arrays (same kernels, same
summation order), eagerly and under jax.jit; and within DESIGN.md's tolerances of
fusedrnn.reference, the oracle. Also: the cache registry (caches freed by their
backward, bounded, recomputed when missing), vmap, and the errors.
"""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import fusedrnn  # noqa: E402
import fusedrnn.jax as fj  # noqa: E402
from fusedrnn import reference  # noqa: E402

from conftest import CELLS, SEMANTICS, TOL, make_problem, rel_err  # noqa: E402
from test_api import BAD_FORWARD, lstm_problem  # noqa: E402

T, B, I, H = 6, 4, 5, 7
NAMES = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    """float64 needs JAX's 64-bit mode, on only inside the test."""
    with jax.enable_x64(request.param is np.float64):
        yield request.param


@pytest.fixture
def limit():
    """Restores the registry's limit after a test changes it."""
    old = fj.cache_limit()
    yield
    fj.set_cache_limit(old)


def layer(args, kw):
    """fj.rnn as a function of the differentiable arrays that are given."""
    cell = args[0]
    given = [i for i, a in enumerate(args[1:]) if a is not None]

    def f(*vals):
        full = list(args[1:])
        for i, v in zip(given, vals):
            full[i] = v
        return fj.rnn(cell, *full, **kw)
    return f, [args[1 + i] for i in given], [NAMES[i] for i in given]


def cotangents(cell, dy, dh_n, dc_n):
    return (jnp.asarray(dy), jnp.asarray(dh_n), None if cell != "lstm" else jnp.asarray(dc_n))


def check_against_kernels(args, kw, dy, dh_n, dc_n, run=lambda f: f):
    """fj.rnn's outputs and vjp against fusedrnn.forward/backward (bitwise); run wraps
    the function that computes them (jax.jit)."""
    cell = args[0]
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    f, vals, names = layer(args, kw)

    def out_and_grads(*vals):
        out, vjp = jax.vjp(f, *vals)
        return out, vjp(cotangents(cell, dy, dh_n, dc_n))
    (jy, jh, jc), jg = run(out_and_grads)(*vals)
    for name, a, b in (("y", jy, y), ("h_n", jh, h_n)):
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    if cell == "lstm":
        np.testing.assert_array_equal(np.asarray(jc), c_n, err_msg="c_n")
    else:
        assert jc is None
    for name, a in zip(names, jg):
        np.testing.assert_array_equal(np.asarray(a), g[name], err_msg=f"d{name}")
    return (jy, jh, jc), dict(zip(names, jg))


@pytest.mark.parametrize("sem", list(SEMANTICS))
@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_kernels_and_close_to_reference(cell, sem, dtype, rng):
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, dtype, rng, **SEMANTICS[sem])
    (y, h_n, c_n), g = check_against_kernels(args, kw, dy, dh_n, dc_n)
    # the oracle
    ry, rh, rc, rcache = reference.forward(*args, **kw)
    rg = reference.backward(rcache, dy, dh_n, dc_n)
    tol = TOL[dtype]
    assert rel_err(np.asarray(y), ry) <= tol and rel_err(np.asarray(h_n), rh) <= tol
    if cell == "lstm":
        assert rel_err(np.asarray(c_n), rc) <= tol
    for name, a in g.items():
        assert rel_err(np.asarray(a), rg[name]) <= tol, name


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_jit_matches_eager_and_frees_caches(cell, dtype, rng):
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, dtype, rng, lengths=True,
                                            reverse=True)
    before = fj.cache_stats()
    check_against_kernels(args, kw, dy, dh_n, dc_n, run=jax.jit)
    after = fj.cache_stats()
    assert after["used"] == before["used"] + 1
    assert after["recomputed"] == before["recomputed"]
    assert after["held"] == 0 and after["held_bytes"] == 0  # the backward took its cache


def test_value_and_grad_of_a_loss(rng):
    """jax.value_and_grad of a loss that uses y, h_n and c_n, under jit, against the
    kernels' gradients for the same cotangents."""
    args, kw, *_ = make_problem("lstm", T, B, I, H, np.float32, rng, mask=True)
    f, vals, names = layer(args, kw)

    def loss(*vals):
        y, h_n, c_n = f(*vals)
        return jnp.sum(y ** 2) + jnp.sum(jnp.tanh(h_n)) + 0.5 * jnp.sum(c_n)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(vals)))))(*vals)
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    g = fusedrnn.backward(cache, 2 * y, 1 - np.tanh(h_n) ** 2, np.full_like(c_n, 0.5))
    expect = np.sum(y.astype(np.float64) ** 2) + np.sum(np.tanh(h_n)) + 0.5 * np.sum(c_n)
    assert abs(float(value) - expect) <= 1e-5 * abs(expect)
    for name, a in zip(names, grads):
        assert rel_err(np.asarray(a), g[name]) <= 1e-6, name


def test_projection(dtype, rng):
    args, kw, dy, dh_n, dc_n = make_problem("lstm", T, B, I, H, dtype, rng, proj=3,
                                            lengths=True)
    w_hr = kw.pop("w_hr")
    y, h_n, c_n, cache = fusedrnn.forward(*args, w_hr=w_hr, **kw)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    f = lambda x, w_hh, w_hr: fj.rnn("lstm", x, args[2], w_hh, *args[4:], w_hr=w_hr, **kw)  # noqa: E731
    out, vjp = jax.vjp(f, args[1], args[3], w_hr)
    assert out[0].shape == (T, B, 3) and out[1].shape == (B, 3) and out[2].shape == (B, H)
    np.testing.assert_array_equal(np.asarray(out[0]), y)
    for name, a in zip(("x", "w_hh", "w_hr"), vjp(cotangents("lstm", dy, dh_n, dc_n))):
        np.testing.assert_array_equal(np.asarray(a), g[name], err_msg=name)


def test_checkpoint_same_gradients(rng):
    args, kw, dy, dh_n, dc_n = make_problem("gru", 9, B, I, H, np.float64, rng, lengths=True)
    with jax.enable_x64(True):
        f, vals, names = layer(args, kw)
        g = jax.vjp(f, *vals)[1](cotangents("gru", dy, dh_n, dc_n))
        fc, *_ = layer(args, dict(kw, checkpoint=True))
        gc = jax.vjp(fc, *vals)[1](cotangents("gru", dy, dh_n, dc_n))
    for name, a, b in zip(names, g, gc):
        assert rel_err(np.asarray(b), np.asarray(a)) <= 1e-12, name


def test_recomputes_when_the_cache_is_gone(rng, limit):
    """A backward whose cache was evicted (limit 0 keeps none) or already used (the
    same vjp twice) runs the forward again and gives the same gradients, bitwise."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", T, B, I, H, np.float32, rng, lengths=True)
    f, vals, names = layer(args, kw)
    ct = cotangents("lstm", dy, dh_n, dc_n)
    _, vjp = jax.vjp(f, *vals)
    s0 = fj.cache_stats()
    first, second = vjp(ct), vjp(ct)
    s1 = fj.cache_stats()
    assert (s1["used"] - s0["used"], s1["recomputed"] - s0["recomputed"]) == (1, 1)
    fj.set_cache_limit(0)
    _, vjp0 = jax.vjp(f, *vals)
    assert fj.cache_stats()["held"] == 0 and fj.cache_stats()["evicted"] == s1["evicted"] + 1
    third = vjp0(ct)
    assert fj.cache_stats()["recomputed"] == s1["recomputed"] + 1
    for name, a, b, c in zip(names, first, second, third):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a), err_msg=name)


def test_limit_bounds_the_caches_held(rng, limit):
    """Forwards whose backward has not run yet hold at most the limit: the oldest go,
    and their backward recomputes."""
    args, kw, dy, dh_n, dc_n = make_problem("gru", T, B, I, H, np.float32, rng)
    f, vals, names = layer(args, kw)
    nbytes = fusedrnn.forward(*args, **kw)[3].nbytes
    fj.set_cache_limit(2 * nbytes)
    s0 = fj.cache_stats()
    vjps = [jax.vjp(f, *vals)[1] for _ in range(5)]
    s1 = fj.cache_stats()
    assert s1["held"] == 2 and s1["held_bytes"] == 2 * nbytes
    assert s1["evicted"] == s0["evicted"] + 3
    grads = [vjp(cotangents("gru", dy, dh_n, dc_n)) for vjp in vjps]
    s2 = fj.cache_stats()
    assert s2["used"] - s1["used"] == 2 and s2["recomputed"] - s1["recomputed"] == 3
    assert s2["held"] == 0
    for g in grads[1:]:
        for name, a, b in zip(names, g, grads[0]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    kept = [jax.vjp(f, *vals) for _ in range(2)]
    assert fj.cache_stats()["held"] == 2
    fj.set_cache_limit(nbytes)  # a smaller limit drops what no longer fits
    assert fj.cache_stats()["held"] == 1
    del kept


def test_dropped_vjp_releases_its_cache(rng):
    """An eager jax.vjp whose function is dropped without a backward frees its cache."""
    import gc

    args, kw, *_ = make_problem("lstm", T, B, I, H, np.float32, rng)
    f, vals, _ = layer(args, kw)
    s0 = fj.cache_stats()
    out, vjp = jax.vjp(f, *vals)
    assert fj.cache_stats()["held"] == s0["held"] + 1
    del vjp
    gc.collect()
    s1 = fj.cache_stats()
    assert s1["held"] == s0["held"] and s1["released"] == s0["released"] + 1


def test_vmap_runs_each_element(rng):
    args, kw, *_ = make_problem("lstm", T, B, I, H, np.float32, rng, lengths=True)
    xs = rng.standard_normal((3, T, B, I)).astype(np.float32)

    def loss(x):
        y, h_n, c_n = fj.rnn("lstm", x, *args[2:], **kw)
        return jnp.sum(y * y) + jnp.sum(c_n)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(xs)
    for k in range(3):
        v, g = jax.value_and_grad(loss)(xs[k])
        np.testing.assert_array_equal(np.asarray(values[k]), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(grads[k]), np.asarray(g))


def test_inference_keeps_no_cache(rng):
    args, kw, *_ = make_problem("rnn_tanh", T, B, I, H, np.float32, rng)
    s0 = fj.cache_stats()
    y = jax.jit(lambda x: fj.rnn("rnn_tanh", x, *args[2:], **kw)[0])(args[1])
    np.testing.assert_array_equal(np.asarray(y), fusedrnn.forward(*args, **kw)[0])
    assert fj.cache_stats() == s0


#: cases of test_api.BAD_FORWARD whose fault is in the values, seen only when the
#: kernel runs
AT_RUN_TIME = {"lengths > T", "lengths < 0"}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_arguments_as_fusedrnn_forward(case):
    """Every rejected input of fusedrnn.forward (docs/errors.md) is rejected by fj.rnn with
    the same exception and message: under jax.jit, when the call is traced; values when
    it runs, inside JAX's runtime error. 64-bit mode on, so that float64 arrays stay
    float64 (without it JAX makes them float32 before fusedrnn sees them)."""
    over, exc, words = BAD_FORWARD[case]
    over = dict(over)  # (the table is test_api's: not to be changed)
    p = lstm_problem()
    kw = {k: over.pop(k) for k in ("lengths", "mask", "reverse", "batch_first",
                                   "checkpoint") if k in over}
    p.update({k: v for k, v in over.items() if k != "cell"})
    cell = over.get("cell", "lstm")
    arrays = {k: v for k, v in p.items() if v is not None}
    flags = {k: kw.pop(k) for k in ("reverse", "batch_first", "checkpoint") if k in kw}
    f = jax.jit(lambda a, k: fj.rnn(cell, **a, **k, **flags)[0])
    with jax.enable_x64(True):
        if case in AT_RUN_TIME:
            with pytest.raises(Exception) as info:
                f(arrays, kw).block_until_ready()
        else:
            with pytest.raises(exc) as info:
                f.lower(arrays, kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg[-500:])


def test_what_jax_refuses(rng):
    """Forward mode and second derivatives are JAX's refusals, with JAX's errors
    (docs/jax.md): nothing runs wrong."""
    args, kw, *_ = make_problem("rnn_tanh", T, B, I, H, np.float32, rng)
    f = lambda w: jnp.sum(fj.rnn("rnn_tanh", args[1], args[2], w)[0])  # noqa: E731
    w = jnp.asarray(args[3])
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(f, (w,), (w,))
    with pytest.raises(ValueError, match="Pure callbacks do not support JVP"):
        jax.grad(lambda w: jnp.sum(jax.grad(f)(w)))(w)


def test_set_cache_limit_checks(limit):
    with pytest.raises(TypeError, match="nbytes must be an int"):
        fj.set_cache_limit(1.5)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        fj.set_cache_limit(-1)
    fj.set_cache_limit(123)
    assert fj.cache_limit() == 123 and fj.cache_stats()["limit"] == 123


def test_import_fusedrnn_does_not_import_jax():
    code = ("import sys, fusedrnn, fusedrnn.reference, fusedrnn.models; "
            "assert 'jax' not in sys.modules and 'fusedrnn.jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

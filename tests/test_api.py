"""The public API's contract: errors, odd-but-valid inputs, threads (DESIGN.md sections 3-4)."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fusedrnn
from fusedrnn import reference

from conftest import (CELLS, GRAD_KEYS, NEEDS, TOL, assert_close, assert_wanted_gradients,
                      make_problem)

BACKENDS = [fusedrnn, reference]
BACKEND_IDS = ["compiled", "reference"]


def lstm_problem(dtype=np.float32, T=4, B=3, I=5, H=6, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(x=r(T, B, I), w_ih=r(4 * H, I), w_hh=r(4 * H, H), b_ih=r(4 * H), b_hh=r(4 * H),
                h0=r(B, H), c0=r(B, H))


def call(mod, cell="lstm", **over):
    p = lstm_problem()
    kw = {k: over.pop(k) for k in ("lengths", "mask", "reverse", "batch_first", "training",
                                   "checkpoint") if k in over}
    p.update(over)
    return mod.forward(cell, p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"],
                       p["c0"], **kw)


# (overrides, exception type, words the message must contain)
BAD_FORWARD = {
    "unknown cell": (dict(cell="lsmt"), ValueError, ["cell", "lsmt"]),
    "cell not str": (dict(cell=3), TypeError, ["cell"]),
    "x rank": (dict(x=np.zeros((4, 3), np.float32)), ValueError, ["x", "(4, 3)"]),
    "x int dtype": (dict(x=np.zeros((4, 3, 5), np.int32)), TypeError, ["x", "int32"]),
    "x float16": (dict(x=np.zeros((4, 3, 5), np.float16)), TypeError, ["x", "float16"]),
    "input size": (dict(w_ih=np.zeros((24, 4), np.float32)), ValueError, ["w_ih", "(24, 5)", "(24, 4)"]),
    "gate count": (dict(cell="gru"), ValueError, ["w_hh", "(18, 6)", "(24, 6)"]),
    "w_hh rank": (dict(w_hh=np.zeros(24, np.float32)), ValueError, ["w_hh"]),
    "mixed dtype": (dict(w_hh=np.zeros((24, 6))), TypeError, ["w_hh", "float64", "float32"]),
    "b_ih shape": (dict(b_ih=np.zeros(23, np.float32)), ValueError, ["b_ih", "(24,)", "(23,)"]),
    "b_hh dtype": (dict(b_hh=np.zeros(24)), TypeError, ["b_hh"]),
    "h0 shape": (dict(h0=np.zeros((1, 3, 6), np.float32)), ValueError, ["h0", "(3, 6)", "(1, 3, 6)"]),
    "c0 shape": (dict(c0=np.zeros((3, 5), np.float32)), ValueError, ["c0", "(3, 6)", "(3, 5)"]),
    "c0 for rnn": (dict(cell="rnn_tanh", w_ih=np.zeros((6, 5), np.float32),
                        w_hh=np.zeros((6, 6), np.float32), b_ih=None, b_hh=None),
                   ValueError, ["c0", "lstm"]),
    "lengths > T": (dict(lengths=[1, 5, 2]), ValueError, ["lengths", "5", "[0, 4]"]),
    "lengths < 0": (dict(lengths=[1, -1, 2]), ValueError, ["lengths", "-1"]),
    "lengths float": (dict(lengths=np.array([1.0, 2.0, 3.0])), TypeError, ["lengths", "float64"]),
    "lengths count": (dict(lengths=[1, 2]), ValueError, ["lengths", "(3,)", "(2,)"]),
    "mask shape": (dict(mask=np.ones((3, 4), bool)), ValueError, ["mask", "(4, 3)", "(3, 4)"]),
    "mask dtype": (dict(mask=np.ones((4, 3), np.int8)), TypeError, ["mask", "int8"]),
    "lengths and mask": (dict(lengths=[1, 2, 3], mask=np.ones((4, 3), bool)), ValueError,
                         ["lengths", "mask"]),
    "reverse not bool": (dict(reverse="yes"), TypeError, ["reverse"]),
    "checkpoint 0": (dict(checkpoint=0), ValueError, ["checkpoint", "0"]),
    "checkpoint float": (dict(checkpoint=2.5), TypeError, ["checkpoint", "float"]),
}


@pytest.mark.parametrize("mod", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_forward_arguments(mod, case):
    over, exc, words = BAD_FORWARD[case]
    with pytest.raises(exc) as info:
        call(mod, **dict(over))
    msg = str(info.value)
    print(f"{case}: {exc.__name__}: {msg}")
    for w in words:
        assert w in msg


@pytest.mark.parametrize("mod", BACKENDS, ids=BACKEND_IDS)
def test_bad_backward_arguments(mod):
    y, h_n, c_n, cache = call(mod)
    with pytest.raises(TypeError, match="cache"):
        mod.backward(None, y)
    with pytest.raises(TypeError, match="cache"):
        mod.backward("not a cache", y)
    with pytest.raises(ValueError, match=r"dy.*\(4, 3, 6\).*\(4, 3, 5\)"):
        mod.backward(cache, y[..., :5])
    with pytest.raises(TypeError, match="dy"):
        mod.backward(cache, y.astype(np.float64))
    with pytest.raises(ValueError, match="dh_n"):
        mod.backward(cache, y, dh_n=h_n[:2])
    with pytest.raises(ValueError, match="dc_n"):
        mod.backward(cache, y, dc_n=c_n.T)
    _, _, _, gru_cache = mod.forward("gru", lstm_problem()["x"], np.zeros((18, 5), np.float32),
                                     np.zeros((18, 6), np.float32))
    with pytest.raises(ValueError, match="dc_n"):
        mod.backward(gru_cache, None, dc_n=c_n)


def test_caches_are_not_interchangeable():
    _, _, _, ref_cache = call(reference)
    y, _, _, cache = call(fusedrnn)
    with pytest.raises(TypeError, match="cache"):
        fusedrnn.backward(ref_cache, y)
    with pytest.raises(TypeError, match="cache"):
        reference.backward(cache, y)


def test_core_checks_shapes_itself():
    """The private extension refuses inconsistent arrays instead of reading out of bounds."""
    p = lstm_problem()
    with pytest.raises(ValueError, match="w_ih"):
        fusedrnn._core.forward("lstm", p["x"], p["w_ih"][:, :2], p["w_hh"], p["b_ih"], p["b_hh"],
                               p["h0"], p["c0"], None, None, False, False, True)
    with pytest.raises(ValueError, match="lengths"):
        fusedrnn._core.forward("lstm", p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
                               p["h0"], p["c0"], np.array([9, 0, 0]), None, False, False, True)
    with pytest.raises(TypeError, match="b_hh"):
        fusedrnn._core.forward("lstm", p["x"], p["w_ih"], p["w_hh"], p["b_ih"],
                               p["b_hh"].astype(np.float64), p["h0"], p["c0"], None, None,
                               False, False, True)


def test_unallocatable_sizes_raise_memory_error():
    # A zero-stride view claims 2**44 input rows: nothing can hold the output.
    x = np.broadcast_to(np.float32(0), (1 << 22, 1 << 22, 1))
    w_ih, w_hh = np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(MemoryError):
        fusedrnn.forward("lstm", x, w_ih, w_hh, training=False)


# ------------------------------------------------------------ odd but valid inputs

ODD_LAYOUTS = {
    "fortran": lambda a: np.asfortranarray(a),
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "read_only": lambda a: _read_only(a),
}


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_odd_memory_layouts(cell, layout, rng):
    args, kw, dy, dh_n, dc_n = make_problem(cell, 5, 4, 3, 6, np.float64, rng, lengths=True)
    f = ODD_LAYOUTS[layout]
    odd = [f(a) if isinstance(a, np.ndarray) else a for a in args]
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    y2, h_n2, c_n2, cache2 = fusedrnn.forward(*odd, **kw)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(h_n, h_n2)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    g2 = fusedrnn.backward(cache2, f(dy), f(dh_n), None if dc_n is None else f(dc_n))
    for k in GRAD_KEYS:
        if g[k] is not None:
            np.testing.assert_array_equal(g[k], g2[k])


@pytest.mark.parametrize("mod", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
def test_empty_sizes(mod, T, B):
    p = lstm_problem(np.float64, T=T, B=B)
    y, h_n, c_n, cache = mod.forward("lstm", p["x"], p["w_ih"], p["w_hh"], h0=p["h0"], c0=p["c0"])
    assert y.shape == (T, B, 6) and h_n.shape == (B, 6) and c_n.shape == (B, 6)
    np.testing.assert_array_equal(h_n, p["h0"])
    g = mod.backward(cache, np.ones_like(y), np.ones_like(h_n), np.ones_like(c_n))
    assert g["x"].shape == p["x"].shape and not g["w_ih"].any() and not g["b_hh"].any()
    np.testing.assert_array_equal(g["h0"], np.ones((B, 6)))


def test_all_lengths_zero(rng):
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 4, 3, 2, 5, np.float64, rng)
    y, h_n, c_n, cache = fusedrnn.forward(*args, lengths=np.zeros(3, np.int32))
    assert not y.any()
    np.testing.assert_array_equal(h_n, args[6])
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    np.testing.assert_array_equal(g["h0"], dh_n)
    np.testing.assert_array_equal(g["c0"], dc_n)
    assert not g["x"].any() and not g["w_hh"].any()


def test_lengths_accept_any_integer_dtype(rng):
    args, *_ = make_problem("gru", 4, 3, 2, 5, np.float64, rng)
    ref = fusedrnn.forward(*args, lengths=[4, 1, 2])[0]
    for dt in (np.int8, np.uint16, np.int32, np.int64):
        np.testing.assert_array_equal(fusedrnn.forward(*args, lengths=np.array([4, 1, 2], dt))[0], ref)


# ------------------------------------------------------------ threads

def test_num_threads_roundtrip():
    old = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(1)
        assert fusedrnn.get_num_threads() == 1
        with pytest.raises(ValueError, match="n"):
            fusedrnn.set_num_threads(0)
        with pytest.raises(TypeError, match="n"):
            fusedrnn.set_num_threads(1.5)
    finally:
        fusedrnn.set_num_threads(old)


def test_l2_cache_size_as_the_system_reports_it():
    """The L2 size that decides whether a small inference call spreads its weights over
    the threads' caches (rnn_impl.h, threads_for_l2) is the system's: sysconf, else
    sysfs, else 0."""
    n = fusedrnn._core.l2_cache_bytes()
    assert isinstance(n, int) and n >= 0
    try:
        sc = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        sc = -1
    if sc > 0:
        assert n == sc
    elif os.path.exists("/sys/devices/system/cpu/cpu0/cache/index2/size"):
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip()
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        assert n == int(text.rstrip("KM")) * unit


def test_num_threads_from_environment():
    code = "import fusedrnn; print(fusedrnn.get_num_threads())"
    env = dict(os.environ, FUSEDRNN_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_results_identical_across_thread_counts(cell, rng):
    """Work is split so that every value is computed the same way whatever the thread count."""
    for semantics in ({}, {"lengths": True}, {"mask": True, "batch_first": True}):
        args, kw, dy, dh_n, dc_n = make_problem(cell, 21, 37, 40, 70, np.float32, rng, **semantics)
        old = fusedrnn.get_num_threads()
        results = []
        try:
            for n in (1, 2, 3):
                fusedrnn.set_num_threads(n)
                y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
                results.append((y, h_n, fusedrnn.backward(cache, dy, dh_n, dc_n)))
        finally:
            fusedrnn.set_num_threads(old)
        for y, h_n, g in results[1:]:
            np.testing.assert_array_equal(y, results[0][0])
            np.testing.assert_array_equal(h_n, results[0][1])
            for k in GRAD_KEYS:
                if g[k] is not None:
                    np.testing.assert_array_equal(g[k], results[0][2][k], err_msg=k)


def _versus_reference(y, h_n, c_n, g, ry, rh, rc, rg):
    """(name, compiled, reference) for the outputs and every gradient the reference has."""
    return [("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc)] + [
        (k, g[k], rg[k]) for k in GRAD_KEYS if rg.get(k) is not None]


@pytest.mark.parametrize("cell,H", [("lstm", 300), ("gru", 300), ("rnn_tanh", 520)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recurrent_products_in_k_chunks(cell, H, dtype, rng):
    """Where H is longer than a chunk of a forward tile's k loop (kernels_impl.h,
    kChunkBytes; float32, 16 KiB chunks: AVX2 128 for lstm, 170 for gru, 256 for rnn;
    AVX-512 64 for lstm), a step's product runs in chunks of equal length (AVX2 here
    3 x 100, 2 x 150, 3 x 174) with the partial sums kept between them, and the
    epilogue runs after the last one. B = 7 leaves a short row tile for every cell
    (AVX2 3 + 3 + 1, 4 + 3, 6 + 1). Against the reference, and training and inference
    forwards equal bitwise. AVX-512's gru and rnn tiles take more than 7 rows, so only
    lstm runs in chunks there: test_recurrent_products_in_k_chunks_avx2 runs this test
    on the AVX2 kernels too."""
    for semantics in ({}, {"lengths": True}, {"mask": True, "reverse": True}):
        _layer_versus_reference(cell, 7, H, dtype, rng, semantics)


def _layer_versus_reference(cell, B, H, dtype, rng, semantics):
    """One layer (T = 3, I = 9) forward and backward against the reference, and its
    training and inference forwards equal bitwise."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, 3, B, 9, H, dtype, rng, **semantics)
    ry, rh, rc, rcache = reference.forward(*args, **kw)
    rg = reference.backward(rcache, dy, dh_n, dc_n)
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    for name, a, r in _versus_reference(y, h_n, c_n, g, ry, rh, rc, rg):
        assert_close(f"{semantics} {name}", a, r, TOL[dtype])
    np.testing.assert_array_equal(fusedrnn.forward(*args, **kw, training=False)[0], y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recurrent_products_in_large_k_chunks(dtype, rng):
    """A step of at least 4 row tiles on the AVX-512 kernels runs its forward product
    in chunks of up to 256 KiB of panel (kernels_impl.h, kChunkBytesManyRows: 1024 k
    for lstm in float32 and float64), so lstm H = 1100 runs in 2 chunks of 550 for
    B = 25 (4 x 6 + 1 rows); the other kernels cut it into 16 KiB chunks. Lengths
    shrink the later steps to fewer rows, which take the small chunks. Against the
    reference, and training and inference forwards equal bitwise."""
    for semantics in ({}, {"lengths": True}):
        _layer_versus_reference("lstm", 25, 1100, dtype, rng, semantics)


def test_recurrent_products_in_k_chunks_avx2():
    """Where the AVX-512 kernels are in use, test_recurrent_products_in_k_chunks again
    on the AVX2 kernels (FUSEDRNN_ISA=avx2), whose gru and rnn tiles run those
    shapes in chunks, in a fresh process (the kernels are chosen at import)."""
    if fusedrnn._core.isa() != "avx512":
        pytest.skip("the kernels in use are not AVX-512's: the test itself ran on them")
    code = ("import sys, pytest, fusedrnn\n"
            "assert fusedrnn._core.isa() == 'avx2', fusedrnn._core.isa()\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1]]))\n")
    test = f"{__file__}::test_recurrent_products_in_k_chunks"
    out = subprocess.run([sys.executable, "-c", code, test], capture_output=True, text=True,
                         env=dict(os.environ, FUSEDRNN_ISA="avx2"),
                         cwd=os.path.dirname(__file__))
    assert out.returncode == 0 and "6 passed" in out.stdout, out.stdout + out.stderr


def _threads_and_checkpoint_versus_reference(args, kw, dy, dh_n, dc_n, checkpoint, label=""):
    """Forward and backward of one float64 problem on 1, 2 and 3 threads, and on 2 with
    ``checkpoint``: every run against the reference, and the runs without checkpointing
    bitwise equal to each other."""
    ry, rh, rc, rcache = reference.forward(*args, **kw)
    rg = reference.backward(rcache, dy, dh_n, dc_n)
    old = fusedrnn.get_num_threads()
    results = []
    try:
        for n, ck in ((1, False), (2, False), (3, False), (2, checkpoint)):
            fusedrnn.set_num_threads(n)
            y, h_n, c_n, cache = fusedrnn.forward(*args, **kw, checkpoint=ck)
            g = fusedrnn.backward(cache, dy, dh_n, dc_n)
            outputs = _versus_reference(y, h_n, c_n, g, ry, rh, rc, rg)
            for name, a, r in outputs:
                assert_close(f"{label}checkpoint={ck} {name}", a, r, TOL[np.float64])
            if not ck:
                results.append([a for _, a, _ in outputs])
    finally:
        fusedrnn.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell,H", [("rnn_tanh", 256), ("gru", 128), ("lstm", 128)])
def test_weight_gradients_in_row_chunks(cell, H, rng):
    """A GRU or Elman layer that runs at least 2048 rows cuts the rows of its
    weight-gradient products into 2 chunks (rnn_impl.h, weight_tasks), the second
    summed into a buffer of its own and added after the products; LSTM's tasks are
    whole gates over all rows. Against the reference with and without checkpointing
    (segments of 5 steps, split into chunks of their own rows), with lengths, and
    bitwise across thread counts."""
    for semantics in ({}, {"lengths": True, "batch_first": True}):
        # (scale: W_hh's spectral radius below 1; at 0.5 rounding differences grow
        # chaotically over the 40 steps)
        args, kw, dy, dh_n, dc_n = make_problem(cell, 40, 120, 16, H, np.float64, rng,
                                                scale=0.05, **semantics)
        _threads_and_checkpoint_versus_reference(args, kw, dy, dh_n, dc_n, 5, f"{semantics} ")


@pytest.mark.parametrize("semantics", [{}, {"batch_first": True}, {"mask": True, "reverse": True},
                                       {"lengths": True, "batch_first": True}])
def test_gemm_column_tasks(semantics, rng):
    """Few rows and wide products: the input GEMM and dx are cut by columns instead of
    rows (rnn_impl.h, gemm_tasks), with the input rows gathered (lengths, mask,
    batch_first) before a barrier and dx scattered after one. Checked against the
    reference, with and without checkpointing, and bitwise across thread counts."""
    # 4 * 3 rows; G*H = 256 gate columns and I = 1400 input columns: each product is
    # >= 2^21 multiply-adds from 6 rows on
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 4, 3, 1400, 64, np.float64, rng,
                                            **semantics)
    if "lengths" in kw:
        kw["lengths"] = np.array([4, 1, 3])  # 8 rows run
    _threads_and_checkpoint_versus_reference(args, kw, dy, dh_n, dc_n, 2)


@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 5)])
def test_unwanted_input_gradients_are_not_computed(cell, proj, rng):
    """fusedrnn._backward(..., need_x, need_h0, need_c0): a gradient not wanted comes
    back as None (no dx product; without dh0, no recurrent product for the first step),
    and every other gradient is bitwise the one backward computes. B = 1 and T = 1-2
    (W_hh read as stored, the first step's product is all of it), larger B with
    lengths, a mask, reverse, batch_first and checkpointing, on 1 and 2 threads."""
    problems = [(1, 1, {}), (2, 1, {"reverse": True}), (9, 5, {"lengths": True}),
                (9, 5, {"mask": True, "batch_first": True}),
                (9, 5, {"lengths": True, "reverse": True, "checkpoint": 3})]
    old = fusedrnn.get_num_threads()
    try:
        for (T, B, semantics), threads in zip(problems * 2, [1] * 5 + [2] * 5):
            fusedrnn.set_num_threads(threads)
            semantics = dict(semantics)
            ck = semantics.pop("checkpoint", False)
            args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, 6, 11, np.float64, rng,
                                                    proj=proj, **semantics)
            cache = fusedrnn.forward(*args, **kw, checkpoint=ck)[3]
            full = fusedrnn.backward(cache, dy, dh_n, dc_n)
            for need in NEEDS:
                g = fusedrnn._backward(cache, dy, dh_n, dc_n, *need)
                assert_wanted_gradients(g, full, need, GRAD_KEYS, f"T={T} {semantics}")
    finally:
        fusedrnn.set_num_threads(old)


@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_input_projection_in_chunks(cell, proj, dtype, rng):
    """An inference forward may make its input projection on the kernels' tiles, a
    chunk of steps at a time, each thread its own columns (rnn_impl.h,
    input_chunk_steps; by default only with AVX-512's tiles and enough rows). Forced on
    here for the kernels in use, with chunks of 1, 2 and 4 steps and as computed, and
    off: every result matches the reference, and the tiled ones are bitwise the same
    whatever the chunk or the thread count. B = 9 and 13 leave partial row tiles, H = 90
    a partial unit block, I = 37 a partial vector; lengths (with an empty row),
    a mask, reverse and batch_first. The shapes are large enough for two threads
    (choose_threads). Before each call, one on other inputs (BLAS's
    projection) leaves other values in the reused temporaries, so a row the tiled
    projection fails to gather shows; a counter says the tiled calls were tiled."""
    T = 16
    old = fusedrnn.get_num_threads()
    try:
        for B, semantics in ((9, {}), (13, {"lengths": True}),
                             (13, {"lengths": True, "reverse": True}),
                             (9, {"mask": True, "batch_first": True}), (9, {"reverse": True})):
            args, kw, _, _, _ = make_problem(cell, T, B, 37, 90, dtype, rng, proj=proj,
                                             scale=0.2, **semantics)
            ry, rh, rc, _ = reference.forward(*args, **kw)
            decoy = list(args)
            decoy[1] = args[1] + dtype(1)
            tiled = []
            for mode, steps, threads in ((0, 0, 2), (1, 1, 1), (1, 1, 2), (1, 2, 2), (1, 4, 1),
                                         (1, 4, 2), (1, 0, 2)):
                fusedrnn._core._set_tiled_input(0, 0)
                fusedrnn.forward(*decoy, **kw, training=False)
                fusedrnn._core._set_tiled_input(mode, steps)
                fusedrnn.set_num_threads(threads)
                before = fusedrnn._core._tiled_input_calls()
                y, h_n, c_n, _ = fusedrnn.forward(*args, **kw, training=False)
                assert fusedrnn._core._tiled_input_calls() - before == mode
                label = f"{semantics} mode={mode} chunk={steps} threads={threads}"
                for name, a, r in (("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc)):
                    if r is not None:
                        assert_close(f"{label} {name}", a, r, TOL[dtype])
                if mode:
                    tiled.append((label, [y, h_n, c_n]))
            for label, out in tiled[1:]:
                for a, b in zip(tiled[0][1], out):
                    if a is not None:
                        np.testing.assert_array_equal(a, b, err_msg=label)
    finally:
        fusedrnn._core._set_tiled_input(-1, 0)
        fusedrnn.set_num_threads(old)


@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_one_short_sequences(cell, proj, dtype, rng):
    """B = 1 and T <= 4: the steps multiply W_hh (and W_hr) as stored, without packing,
    forward and backward, and the input projection, the weight gradients and dx of a
    layer of <= 4 rows run on the same products instead of BLAS (rnn_impl.h,
    raw_weights and kRawGemmRows); T = 5 takes the packed panels. I = 37
    and H = 70 or 650 leave partial vectors in k and in the last unit block; the
    layers of H = 70 run on one thread (choose_threads), those of H = 650 on all.
    Checked against the reference, with and without checkpointing (whose backward
    recomputes the steps), and bitwise across thread counts. B = 3 at T = 1: packed
    panels, but a layer of <= 4 rows, so its products skip BLAS."""
    for T, B, H in ((1, 1, 70), (2, 1, 70), (4, 1, 70), (5, 1, 70), (2, 1, 650), (1, 3, 70)):
        for semantics in ({}, {"lengths": True}, {"mask": True, "reverse": True},
                          {"batch_first": True, "reverse": True}):
            args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, 37, H, dtype, rng, proj=proj,
                                                    **semantics)
            if "lengths" in kw:
                kw["lengths"] = np.array([T - 1] + [T] * (B - 1))
            ry, rh, rc, rcache = reference.forward(*args, **kw)
            rg = reference.backward(rcache, dy, dh_n, dc_n)
            old = fusedrnn.get_num_threads()
            results = []
            try:
                for n, ck in ((1, False), (2, False), (1, 1), (2, 1)):
                    fusedrnn.set_num_threads(n)
                    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw, checkpoint=ck)
                    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
                    out = _versus_reference(y, h_n, c_n, g, ry, rh, rc, rg)
                    for name, a, r in out:
                        assert_close(f"T={T} {semantics} {name}", a, r, TOL[dtype])
                    results.append([a for _, a, _ in out])
            finally:
                fusedrnn.set_num_threads(old)
            # thread counts; and the outputs with checkpointing, which cuts the input
            # projection per segment: the raw product gives each value the same way
            # whatever the cut (BLAS at T = 5 need not; gradients sum per segment)
            pairs = [(results[0], results[1]), (results[2], results[3])]
            if T <= 4:
                pairs.append((results[0][:3], results[2][:3]))
            for one, two in pairs:
                for a, b in zip(one, two):
                    np.testing.assert_array_equal(a, b)


def test_portable_kernels_batch_one(tmp_path):
    """The portable build of the kernels (FUSEDRNN_ISA=generic: 4 float lanes) on the
    paths of test_batch_one_short_sequences and on the packed panel, against the
    reference, in a fresh process (the choice is made at import)."""
    code = (
        "import numpy as np, fusedrnn\n"
        "from fusedrnn import reference\n"
        "assert fusedrnn._core.isa() == 'generic', fusedrnn._core.isa()\n"
        "rng = np.random.default_rng(3)\n"
        "for cell in ('rnn_tanh', 'gru', 'lstm'):\n"
        "    G = fusedrnn.CELLS[cell]\n"
        "    for T, B, I, H in ((1, 1, 37, 70), (3, 1, 5, 9), (6, 3, 37, 70)):\n"
        "        x = rng.standard_normal((T, B, I)).astype(np.float32)\n"
        "        w = [rng.standard_normal(s).astype(np.float32) * 0.3\n"
        "             for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))]\n"
        "        y, h, c, cache = fusedrnn.forward(cell, x, *w)\n"
        "        ry, rh, rc, rcache = reference.forward(cell, x, *w)\n"
        "        assert np.abs(y - ry).max() < 1e-5, (cell, T, B)\n"
        "        dy = rng.standard_normal(y.shape).astype(np.float32)\n"
        "        g, rg = fusedrnn.backward(cache, dy), reference.backward(rcache, dy)\n"
        "        for k in ('x', 'w_ih', 'w_hh'):\n"
        "            assert np.abs(g[k] - rg[k]).max() < 1e-4 * max(1, np.abs(rg[k]).max()), k\n"
        "print('ok')\n")
    env = dict(os.environ, FUSEDRNN_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_concurrent_calls_match_serial(rng):
    args, kw, dy, dh_n, dc_n = make_problem("gru", 30, 8, 32, 48, np.float64, rng, lengths=True)
    y, h_n, _, cache = fusedrnn.forward(*args, **kw)
    expected = fusedrnn.backward(cache, dy, dh_n, dc_n)
    failures = []

    def worker():
        for _ in range(5):
            y2, _, _, c2 = fusedrnn.forward(*args, **kw)
            g2 = fusedrnn.backward(c2, dy, dh_n, dc_n)
            if not (np.array_equal(y, y2) and all(np.array_equal(expected[k], g2[k])
                                                  for k in ("x", "w_ih", "w_hh", "h0"))):
                failures.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_gil_released_during_compute(rng):
    """Another Python thread keeps running while a long call computes."""
    args, kw, *_ = make_problem("lstm", 400, 64, 128, 128, np.float32, rng)
    done = threading.Event()
    ticks = []

    def long_call():
        fusedrnn.forward(*args, **kw, training=False)
        done.set()

    t = threading.Thread(target=long_call)
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    print(f"call took {elapsed * 1e3:.1f} ms, main thread ticked {len(ticks)} times")
    if elapsed > 0.05:  # a call long enough to tell
        assert len(ticks) >= 10


def test_import_does_not_import_torch():
    code = "import sys, fusedrnn, fusedrnn.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_examples_run(tmp_path):
    """The README's examples are code that works."""
    import importlib.util
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("README.md not next to the tests")
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    examples = [b for b in blocks if "import" in b]  # the others are signatures
    assert len(examples) >= 2
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples may write files
    try:
        for i, code in enumerate(examples):
            if "import torch" in code and importlib.util.find_spec("torch") is None:
                continue  # the PyTorch drop-in's example needs torch
            if "import jax" in code and importlib.util.find_spec("jax") is None:
                continue  # the JAX adapter's example needs jax
            exec(compile(code, f"README example {i}", "exec"), {})
    finally:
        os.chdir(cwd)

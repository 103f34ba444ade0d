"""The CUDA backend's kernels and drivers, run on the host emulator, against the reference.

``fusedrnn._cuda_emu`` is the CUDA backend (csrc/cuda/rnn_cuda.cu, the
bindings, the Python layer in fusedrnn._device) compiled by the C++ compiler
against csrc/cuda/emulate.h: ordinary kernels run thread by thread, the
persistent kernels run every CUDA thread as an OS thread with real barriers,
and cuBLAS's GemmEx is a column-major loop that enforces cuBLAS's argument
rules. So these tests check, without a GPU, the index arithmetic, the GEMM
argument mapping, the state bookkeeping of both algorithms, the
lengths/mask/reverse rules and the 16-bit conversions, every cell against the
float64 reference. They say nothing about real-GPU behaviour (memory model,
warp scheduling, cuBLAS itself, speed): tests/test_cuda.py does that on a
device.

Built only with ``-C cmake.define.FUSEDRNN_CUDA_EMULATOR=ON`` (CI: .ci/sanitize,
under AddressSanitizer, which also catches any out-of-bounds index); skipped
otherwise.
"""

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _device, reference

from conftest import (CELLS, NEEDS, SEMANTICS, assert_wanted_gradients, make_problem, rel_err,
                      valid_steps)

emu = pytest.importorskip("fusedrnn._cuda_emu", reason="built only with FUSEDRNN_CUDA_EMULATOR=ON")

#: relative-to-scale bounds against the float64 reference on the same rounded
#: inputs. float32: DESIGN.md section 7. 16-bit: the state h is stored in the
#: array type every step (as cuDNN does), so each step adds a rounding of
#: relative size eps (float16 2^-11, bfloat16 2^-8) that the following steps
#: carry, and the gate gradients are rounded once before the weight-gradient
#: GEMMs. Over 90 problems of these sizes (7 steps) the worst error measured
#: was 5.8 eps for float16 and 3.7 eps for bfloat16; the bounds are 20 and
#: 12.8 eps, leaving a factor of about 3.5.
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
ALGOS = ("standard", "persistent")
GRADS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """Route fusedrnn._device through the emulator; 4 emulated multiprocessors."""
    monkeypatch.setattr(_device, "_cuda", emu)
    monkeypatch.setenv("FUSEDRNN_EMU_SMS", "4")


def to_device(a, dtype):
    return None if a is None else fusedrnn.DeviceArray.from_host(a, dtype=dtype)


def rounded(a, dtype):
    """a as the device holds it, back in float64 (the reference's inputs)."""
    return None if a is None else to_device(a, dtype).get().astype(np.float64)


def host(a):
    return None if a is None else a.get().astype(np.float64)


def run(cell, problem, dtype, algo):
    (args, kw, dy, dh_n, dc_n) = problem
    arrays = args[1:]
    dev = [to_device(a, dtype) for a in arrays]
    ref_in = [rounded(a, dtype) for a in arrays]
    w_hr = kw.get("w_hr")  # projection: on the device too, rounded for the reference
    dkw, rkw = {**kw, "w_hr": to_device(w_hr, dtype)}, {**kw, "w_hr": rounded(w_hr, dtype)}
    y, h_n, c_n, cache = _device.forward(cell, *dev, **dkw, algo=algo)
    # (nothing to run: no algorithm; benchmark mode: the one it picked)
    assert cache.algo == algo or np.prod(y.shape) == 0 or algo == "benchmark"
    g = fusedrnn.backward(cache, to_device(dy, dtype), to_device(dh_n, dtype), to_device(dc_n, dtype))
    ry, rh_n, rc_n, rcache = reference.forward(cell, *ref_in, **rkw)
    rg = reference.backward(rcache, rounded(dy, dtype), rounded(dh_n, dtype), rounded(dc_n, dtype))
    out = {"y": (host(y), ry), "h_n": (host(h_n), rh_n), "c_n": (host(c_n), rc_n)}
    for k in GRADS:
        out["d" + k] = (host(g[k]), rg[k])
    return out, cache, g


def check(out, tol):
    worst = {k: rel_err(a, r) for k, (a, r) in out.items()}
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad}"
    return max(worst.values())


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("semantics", list(SEMANTICS))
@pytest.mark.parametrize("cell", CELLS)
def test_float32_matches_reference(cell, semantics, algo, rng):
    # H = 7 on 4 emulated multiprocessors: the persistent kernels run 4 blocks
    # of 2, 2, 2 and 1 hidden units.
    problem = make_problem(cell, 7, 5, 6, 7, np.float64, rng, **SEMANTICS[semantics])
    out, cache, _ = run(cell, problem, "float32", algo)
    check(out, TOL["float32"])
    assert cache.nbytes > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("semantics", ["plain", "reverse_lengths", "batch_first_mask"])
@pytest.mark.parametrize("cell", CELLS)
def test_16bit_matches_reference(cell, semantics, algo, dtype, rng):
    problem = make_problem(cell, 7, 5, 6, 7, np.float64, rng, **SEMANTICS[semantics])
    out, _, _ = run(cell, problem, dtype, algo)
    check(out, TOL[dtype])


def expected_gemms(algo, G, I, H, running, P=None):
    """(m, n, k) of every product a forward+backward should run when step t has
    running[t] running rows: the input projection and the three deferred
    weight-gradient products over the rows that run, and (standard algorithm)
    each step's recurrent product forward and backward over its running rows.
    With a projection of size P (lstm) also the deferred dW_hr and (standard
    algorithm) each step's h = W_hr m and dm = dh W_hr over its running rows.
    Products with no rows are not run."""
    R, K = sum(running), P or H
    log = [(G * H, R, I), (I, R, G * H), (I, G * H, R), (K, G * H, R)] if R else []
    if algo == "standard":  # the persistent kernels multiply inside
        log += [(G * H, n, K) for n in running if n] + [(K, n, G * H) for n in running if n]
    if P and R:
        log += [(H, P, R)]
        if algo == "standard":
            log += [(P, n, H) for n in running if n] + [(H, n, P) for n in running if n]
    return sorted(log)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_products_cover_valid_steps_only(cell, rng):
    """No product includes a step that is not valid (a row past its end with
    lengths, a missing value with a mask), sorted lengths or not, in either
    direction and layout: the input projection and the deferred products have
    as many rows as there are valid steps, and each step's recurrent GEMM,
    forward and backward, as many as the step has valid rows (rows that are
    not a prefix of the batch are packed first). Both algorithms match the
    reference."""
    T, B, I, H = 7, 5, 6, 7
    G = fusedrnn.CELLS[cell]
    m = rng.random((T, B)) < 0.6
    cases = [{"lengths": np.array(n)} for n in ([7, 7, 3, 1, 0], [0, 2, 7, 1, 5],
                                                 [3, 7, 3, 7, 1], [1, 1, 1, 1, 1],
                                                 [0, 0, 0, 0, 0], [7, 7, 7, 7, 7])]
    cases += [{"mask": m}, {"mask": np.zeros((T, B), bool)}, {"mask": np.ones((T, B), bool)}]
    for case in cases:
        running = valid_steps(case, T, B).sum(axis=1).tolist()
        for reverse, batch_first in ((False, False), (True, False), (False, True)):
            args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, np.float64, rng,
                                                    reverse=reverse, batch_first=batch_first)
            kw.update(case)
            if batch_first and "mask" in case:
                kw["mask"] = case["mask"].T
            for algo in ALGOS:
                emu.take_gemm_log()
                out, _, _ = run(cell, (args, kw, dy, dh_n, dc_n), "float32", algo)
                check(out, TOL["float32"])
                log = sorted(tuple(g) for g in emu.take_gemm_log())
                assert log == expected_gemms(algo, G, I, H, running), (case, reverse, algo)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cell,P", [("lstm", 0), ("gru", 0), ("lstm", 3)],
                         ids=["lstm", "gru", "lstm_projection"])
def test_unwanted_input_gradients_are_not_computed(cell, P, algo, rng):
    """fusedrnn._backward(..., need_x, need_h0, need_c0) on the device: a gradient not
    wanted comes back as None, its product is not run (no dx GEMM; without dh0, no
    recurrent GEMM for the first step in the standard algorithm, of width P with a
    projection), and every other gradient is bitwise the one of a backward that
    computes them all."""
    T, B, I, H = 7, 5, 6, 7
    G = fusedrnn.CELLS[cell]
    for semantics in ("plain", "lengths", "reverse_mask", "batch_first_lengths"):
        (args, kw, dy, dh_n, dc_n) = make_problem(cell, T, B, I, H, np.float64, rng, proj=P,
                                                  **SEMANTICS[semantics])
        dev = [to_device(a, "float32") for a in args[1:]]
        kw["w_hr"] = to_device(kw.get("w_hr"), "float32")
        cache = _device.forward(cell, *dev, **kw, algo=algo)[3]
        grads_in = [to_device(a, "float32") for a in (dy, dh_n, dc_n)]
        valid = valid_steps(kw, T, B)
        R, first = int(valid.sum()), int(valid[T - 1 if kw["reverse"] else 0].sum())
        emu.take_gemm_log()
        full = {k: host(v) for k, v in fusedrnn.backward(cache, *grads_in).items()}
        full_log = [tuple(g) for g in emu.take_gemm_log()]
        for need in NEEDS:
            g = fusedrnn._backward(cache, *grads_in, *need)
            log = sorted(tuple(m) for m in emu.take_gemm_log())
            want_log = list(full_log)
            if not need[0] and R:
                want_log.remove((I, R, G * H))  # dx
            if not need[1] and algo == "standard" and first:
                want_log.remove((P or H, first, G * H))  # the first step's dh product
            assert log == sorted(want_log), (semantics, need)
            assert_wanted_gradients(g, full, need, GRADS, semantics, host)


@pytest.mark.parametrize("algo", ALGOS)
def test_larger_problem(algo, rng):
    """More hidden units than one warp's lanes and several warps' worth of rows."""
    problem = make_problem("lstm", 3, 3, 40, 37, np.float64, rng, lengths=True)
    out, _, _ = run("lstm", problem, "float32", algo)
    check(out, TOL["float32"])


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
def test_empty(cell, T, B, algo, rng):
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, 3, 4, np.float64, rng)
    out, _, _ = run(cell, (args, kw, dy, dh_n, dc_n), "float32", algo)
    check(out, TOL["float32"])


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("semantics", ["lengths", "mask"])
@pytest.mark.parametrize("cell,P", [("lstm", 0), ("gru", 0), ("lstm", 3)],
                         ids=["lstm", "gru", "lstm_projection"])
def test_nan_in_skipped_steps_stays_out(cell, P, semantics, algo, rng):
    """x at padded or masked-out steps may hold anything, NaN included: the
    results equal those with zeros there (the cache keeps only the valid rows of
    x for dW_ih = dgates^T x, where 0 * NaN would be NaN)."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, 6, 4, 5, 7, np.float64, rng, proj=P,
                                            **{semantics: True})
    x = args[1]
    skipped = ~valid_steps(kw, 6, 4)
    assert skipped.any()
    results = []
    for fill in (0.0, np.nan):
        xf = x.copy()
        xf[skipped] = fill
        problem = ([args[0], xf] + args[2:], kw, dy, dh_n, dc_n)
        out, _, _ = run(cell, problem, "float32", algo)
        results.append({k: a for k, (a, _) in out.items()})
    for k, a in results[1].items():
        if a is not None:
            assert np.array_equal(a, results[0][k]), k


def test_backward_twice_is_identical(rng):
    args, kw, dy, dh_n, dc_n = make_problem("gru", 5, 3, 4, 6, np.float64, rng, lengths=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    for algo in ALGOS:
        *_, cache = _device.forward("gru", *dev, **kw, algo=algo)
        d = to_device(dy, "float32")
        g1 = fusedrnn.backward(cache, d)
        g2 = fusedrnn.backward(cache, d)
        for k in GRADS:
            if g1[k] is not None:
                assert np.array_equal(g1[k].get(), g2[k].get()), k


def test_inference_equals_training_forward(rng):
    """training=False runs the ping-pong state buffers instead of the cache:
    same outputs, bit for bit."""
    args, kw, *_ = make_problem("lstm", 6, 4, 5, 7, np.float64, rng, reverse=True, mask=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    for algo in ALGOS:
        y1, h1, c1, cache = _device.forward("lstm", *dev, **kw, algo=algo)
        y2, h2, c2, none = _device.forward("lstm", *dev, **kw, training=False, algo=algo)
        assert none is None
        for a, b in ((y1, y2), (h1, h2), (c1, c2)):
            assert np.array_equal(a.get(), b.get())


def test_algorithms_agree(rng):
    """Standard and persistent forward differ only in the order of the
    recurrent product's sums."""
    args, kw, *_ = make_problem("gru", 6, 4, 5, 9, np.float64, rng, lengths=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    ys = [_device.forward("gru", *dev, **kw, training=False, algo=a)[0].get() for a in ALGOS]
    assert rel_err(ys[0], ys[1]) < 1e-6


def test_cache_nbytes_formula(rng):
    """One device allocation: x, w_ih, w_hh copies, the state entering each step,
    the LSTM cell after each step, the saved gates, c0, lengths; 256-byte aligned."""
    T, B, I, H = 5, 3, 4, 6
    args, kw, *_ = make_problem("lstm", T, B, I, H, np.float64, rng, lengths=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    *_, cache = _device.forward("lstm", *dev, **kw, algo="standard")
    a = lambda n: -(-n // 256) * 256  # noqa: E731
    N, GH = T * B, 4 * H
    expect = (a(N * I * 4) + a(GH * I * 4) + a(GH * H * 4) + a(N * H * 4) + a(N * H * 4)
              + a(N * 4 * H * 4) + a(B * H * 4) + a(B * 4))
    assert cache.nbytes == expect


def test_persistent_refuses_what_does_not_fit():
    """A W_hh slice larger than a block's shared memory: a clear ValueError."""
    H = 250  # 63 units per block on 4 multiprocessors: 4*63 rows of 250 floats > 227 KiB
    x = fusedrnn.DeviceArray((1, 1, 1), "float32", 0)
    w_ih = fusedrnn.DeviceArray((4 * H, 1), "float32", 0)
    w_hh = fusedrnn.DeviceArray((4 * H, H), "float32", 0)
    with pytest.raises(ValueError, match="persistent"):
        _device.forward("lstm", x, w_ih, w_hh, training=False, algo="persistent")
    assert emu.choose_algo("lstm", "float32", 1, 1, 1, H, 0) == "standard"
    assert emu.choose_algo("lstm", "float32", 1, 1, 1, 16, 0) == "persistent"


def layouts(cell, dtype, B, H, P=0):
    """The persistent forward and backward kernels' layouts for (B, H) here (P: projection)."""
    return [emu.persistent_layout(cell, dtype, B, H, backward, 0, P) for backward in (False, True)]


def assert_same_outputs(out, expected):
    """Every output and gradient of run() the same, bit for bit."""
    for k, (a, _) in out.items():
        if a is not None:
            assert np.array_equal(a, expected[k][0]), k


def small_smem(dtype, B, H, cell="lstm"):
    """FUSEDRNN_EMU_SMEM for which both persistent kernels fit but stage only
    part of a batch of B rows at a time (6 of them forward)."""
    es, G = (4 if dtype == "float32" else 2), fusedrnn.CELLS[cell]
    U = -(-H // 4)  # (4 emulated multiprocessors)
    ld = -(-H * es // 16) * 16 // es
    return G * U * ld * es + B * G * U * 4 + 6 * ld * es  # W slice, products, 6 rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("semantics", ["plain", "tiles_end", "batch_first_mask"])
def test_persistent_stages_the_batch_in_parts(semantics, dtype, monkeypatch, rng):
    """Less shared memory than a whole batch's state: the persistent kernels
    stage a few rows at a time, over several tiles of 8 rows (with lengths, a
    whole tile that has ended skips its products), and a thread has more
    pointwise elements than the ones it loads a step early."""
    T, B, I, H = 4, 20, 6, 40
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", str(small_smem(dtype, B, H)))
    for lay, ld in zip(layouts("lstm", dtype, B, H), (H, 4 * H)):
        assert lay["ok"] and 1 <= lay["bc"] < B, lay
        assert lay["ld"] == ld and lay["ks"] == 1
    assert B * lay["U"] > 2 * 64  # (kPrefetch elements of 64 emulated threads)
    kw = {"batch_first": True, "mask": True} if semantics == "batch_first_mask" else {}
    args, pkw, dy, dh_n, dc_n = make_problem("lstm", T, B, I, H, np.float64, rng, **kw)
    if semantics == "tiles_end":  # rows 8..15 (the second tile) end after one step
        pkw["lengths"] = np.array([T] * 8 + [1] * 8 + [0, 2, T, 3])
        pkw["reverse"] = True
    out, cache, _ = run("lstm", (args, pkw, dy, dh_n, dc_n), dtype, "persistent")
    check(out, TOL[dtype])


@pytest.mark.parametrize("semantics,P", [("tiles_end", 13), ("batch_first_mask", 50)])
def test_persistent_projection_stages_the_batch_in_parts(semantics, P, monkeypatch, rng):
    """The projected persistent kernels with room for about 6 staged rows of 20:
    forward stages the state (P values), then o * tanh(c) (H values); backward
    the gate gradients (4H), then the state's gradients (P); each through the
    same rooms with its own padded length (P = 13 and 50 around H = 40; 13 pads)."""
    T, B, I, H = 4, 20, 6, 40
    lays = layouts("lstm", "float32", B, H, P)
    assert all(lay["ok"] and lay["V"] == -(-P // lay["blocks"]) for lay in lays), lays
    assert [lay["ldm"] for lay in lays] == [H, -(-P // 4) * 4]

    def need(lay):  # shared memory for 6 staged rows
        rows, rows2 = (4 * lay["U"], lay["V"]) if lay is lays[0] else (lay["V"], lay["U"])
        return 4 * (rows * lay["ld"] + rows2 * lay["ldm"] + B * max(rows, rows2)
                    + 6 * max(lay["ld"], lay["ldm"]))
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", str(max(need(lay) for lay in lays)))
    lays = layouts("lstm", "float32", B, H, P)
    assert all(lay["ok"] and 6 <= lay["bc"] < B and lay["ks"] == 1 for lay in lays), lays
    assert min(lay["bc"] for lay in lays) == 6
    kw = {"batch_first": True, "mask": True} if semantics == "batch_first_mask" else {}
    args, pkw, dy, dh_n, dc_n = make_problem("lstm", T, B, I, H, np.float64, rng, proj=P, **kw)
    if semantics == "tiles_end":  # rows 8..15 (the second tile) end after one step
        pkw["lengths"] = np.array([T] * 8 + [1] * 8 + [0, 2, T, 3])
        pkw["reverse"] = True
    out, cache, _ = run("lstm", (args, pkw, dy, dh_n, dc_n), "float32", "persistent")
    check(out, TOL["float32"])
    y, h_n, c_n, none = _device.forward("lstm", *[to_device(a, "float32") for a in args[1:]],
                                        **{**pkw, "w_hr": to_device(pkw["w_hr"], "float32")},
                                        training=False, algo="persistent")
    assert_same_outputs({"y": (host(y), None), "h_n": (host(h_n), None),
                         "c_n": (host(c_n), None)}, out)


@pytest.mark.parametrize("cell,H,sms,split", [("lstm", 40, 16, (1, 2)), ("rnn_tanh", 130, 40, (2, 2))])
def test_persistent_splits_k_among_warps(cell, H, sms, split, monkeypatch, rng):
    """Fewer tiles than warps: each warp sums one part of k, and the parts are
    added in order (backward of an LSTM with 3 units per block; both kernels
    of an Elman cell with 4 units per block and rows of 132 floats)."""
    monkeypatch.setenv("FUSEDRNN_EMU_SMS", str(sms))
    assert tuple(lay["ks"] for lay in layouts(cell, "float32", 5, H)) == split
    problem = make_problem(cell, 3, 5, 4, H, np.float64, rng, lengths=True)
    out, _, _ = run(cell, problem, "float32", "persistent")
    check(out, TOL["float32"])


@pytest.mark.parametrize("units,blocks", [("3", 3), ("7", 1), ("100", 1)])
def test_persistent_units_per_block_knob(units, blocks, monkeypatch, rng):
    """FUSEDRNN_CUDA_PERSISTENT_UNITS: at least that many hidden units per block
    (at most H), so fewer blocks; the results do not depend on it."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_UNITS", units)
    for lay in layouts("gru", "float32", 5, 7):
        assert (lay["U"], lay["blocks"]) == (min(int(units), 7), blocks), lay
    problem = make_problem("gru", 5, 5, 6, 7, np.float64, rng, reverse=True, lengths=True)
    out, _, _ = run("gru", problem, "float32", "persistent")
    check(out, TOL["float32"])


@pytest.mark.parametrize("semantics", list(SEMANTICS))
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_cluster_mode_equals_grid_mode(cell, semantics, monkeypatch, rng):
    """FUSEDRNN_CUDA_PERSISTENT_CLUSTER=1: one thread-block cluster whose
    blocks pass each step's state (forward) and gate gradients (backward) to
    each other through distributed shared memory instead of global memory and
    a grid barrier. The same products in the same order as the grid mode's
    (4 emulated multiprocessors: the same 4 blocks), so the same results, bit
    for bit; and within the float32 bound of the reference."""
    problem = make_problem(cell, 6, 5, 6, 7, np.float64, rng, **SEMANTICS[semantics])
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", mode)
        assert [lay["cluster"] for lay in layouts(cell, "float32", 5, 7)] == [4 * int(mode)] * 2
        out, cache, _ = run(cell, problem, "float32", "persistent")
        check(out, TOL["float32"])
        results[mode] = out
    assert_same_outputs(results["1"], results["0"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell,semantics", [("lstm", "reverse_lengths"), ("gru", "batch_first_mask"),
                                            ("rnn_tanh", "plain")])
def test_persistent_cluster_mode_16bit(cell, semantics, dtype, monkeypatch, rng):
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    assert all(lay["cluster"] for lay in layouts(cell, dtype, 5, 7))
    problem = make_problem(cell, 7, 5, 6, 7, np.float64, rng, **SEMANTICS[semantics])
    out, _, _ = run(cell, problem, dtype, "persistent")
    check(out, TOL[dtype])


def test_persistent_cluster_mode_larger_and_checkpointed(monkeypatch, rng):
    """8 blocks of 5 units (FUSEDRNN_EMU_SMS = 8: a full portable cluster),
    B = 11 (two tiles of vectors), rows of 40 floats (16-byte moves); and a
    checkpointed cache, whose backward recomputes each segment in cluster
    mode too."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    monkeypatch.setenv("FUSEDRNN_EMU_SMS", "8")
    assert [lay["cluster"] for lay in layouts("lstm", "float32", 11, 40)] == [8, 8]
    problem = make_problem("lstm", 4, 11, 6, 40, np.float64, rng, mask=True)
    out, _, _ = run("lstm", problem, "float32", "persistent")
    check(out, TOL["float32"])
    args, kw, dy, *_ = problem
    dev = [to_device(a, "float32") for a in args[1:]]
    grads = []
    for ck in (None, 2):
        *_, cache = _device.forward("lstm", *dev, **kw, algo="persistent",
                                    **({"checkpoint": ck} if ck else {}))
        g = fusedrnn.backward(cache, to_device(dy, "float32"))
        grads.append({k: v.get() for k, v in g.items() if v is not None})
    for k in grads[0]:
        assert np.array_equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("smem,sizes", [(2000, [16, 0]), (3500, [8, 16])])
def test_persistent_cluster_of_16(smem, sizes, monkeypatch, rng):
    """Where 8 blocks cannot hold W_hh and the vectors, a cluster of 16 (sm_90's
    largest, non-portable); forward and backward choose their modes apart
    (16 and grid, or 8 and 16) and still agree with the reference."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    monkeypatch.setenv("FUSEDRNN_EMU_SMS", "16")
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", str(smem))
    assert [lay["cluster"] for lay in layouts("lstm", "float32", 2, 32)] == sizes
    problem = make_problem("lstm", 4, 2, 3, 32, np.float64, rng, reverse=True)
    out, cache, _ = run("lstm", problem, "float32", "persistent")
    check(out, TOL["float32"])


def test_persistent_cluster_that_cannot_be_resident_runs_in_grid_mode(monkeypatch, rng):
    """A cluster the device cannot make resident at launch (here: none above 4
    blocks): the persistent kernels run in grid mode instead, same results."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    monkeypatch.setenv("FUSEDRNN_EMU_SMS", "8")
    assert [lay["cluster"] for lay in layouts("gru", "float32", 5, 16)] == [8, 8]
    problem = make_problem("gru", 5, 5, 6, 16, np.float64, rng, lengths=True)
    expected, _, _ = run("gru", problem, "float32", "persistent")
    monkeypatch.setenv("FUSEDRNN_EMU_MAX_CLUSTER", "4")
    out, cache, _ = run("gru", problem, "float32", "persistent")
    assert cache.algo == "persistent"
    assert_same_outputs(out, expected)


def test_persistent_cluster_mode_falls_back_to_grid_mode(monkeypatch, rng):
    """The cluster mode keeps the whole batch twice in shared memory; where it
    does not fit, the persistent kernels run in grid mode (staging in parts)."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", str(small_smem("float32", 20, 40)))
    lays = layouts("lstm", "float32", 20, 40)
    assert all(lay["ok"] and lay["cluster"] == 0 and lay["bc"] < 20 for lay in lays), lays
    problem = make_problem("lstm", 3, 20, 6, 40, np.float64, rng, lengths=True)
    out, _, _ = run("lstm", problem, "float32", "persistent")
    check(out, TOL["float32"])


def test_unknown_algo_is_rejected():
    with pytest.raises(ValueError, match="algo"):
        _device.forward("lstm", fusedrnn.DeviceArray((1, 1, 1), "float32", 0),
                        fusedrnn.DeviceArray((4, 1), "float32", 0),
                        fusedrnn.DeviceArray((4, 1), "float32", 0), algo="fast")


class DLPackOnly:
    """A producer that speaks only DLPack (as JAX arrays do for bfloat16)."""

    def __init__(self, arr):
        self.arr = arr
        self.streams = []

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        self.streams.append(stream)
        return self.arr.__dlpack__(stream=stream)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dlpack_inputs(dtype, rng):
    """Inputs through DLPack give the results of the same arrays passed
    directly, and are asked for on the legacy default stream (1)."""
    args, kw, dy, *_ = make_problem("lstm", 5, 3, 4, 6, np.float64, rng, lengths=True)
    dev = [to_device(a, dtype) for a in args[1:]]
    wrapped = [None if a is None else DLPackOnly(a) for a in dev]
    y1, h1, c1, cache1 = _device.forward("lstm", *dev, **kw)
    y2, h2, c2, cache2 = _device.forward("lstm", *wrapped, **kw)
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        assert np.array_equal(a.get(), b.get())
    assert wrapped[0].streams == [1]
    g1 = fusedrnn.backward(cache1, to_device(dy, dtype))
    g2 = fusedrnn.backward(cache2, DLPackOnly(to_device(dy, dtype)))
    assert g1["w_hr"] is None and g2["w_hr"] is None  # (no projection)
    for k in GRADS[:-1]:
        assert np.array_equal(g1[k].get(), g2[k].get()), k


def test_device_array_exports_dlpack():
    a = fusedrnn.DeviceArray.from_host(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert a.__dlpack_device__() == (2, 0)
    v = emu.from_dlpack_capsule(a.__dlpack__())
    assert (v.ptr, v.shape, v.strides, v.dtype) == (a.ptr, (2, 3), (3, 1), "float32")
    with pytest.raises(ValueError, match="consumed"):
        cap = a.__dlpack__()
        emu.from_dlpack_capsule(cap)
        emu.from_dlpack_capsule(cap)


# ------------------------------------------------------------- projection


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("P", [3, 9])
@pytest.mark.parametrize("semantics", list(SEMANTICS))
def test_projection_matches_reference(semantics, P, algo, rng):
    """LSTM with projection (w_hr [P, H], the state h = W_hr (o * tanh c) has P
    values), P smaller and larger than H = 7, against the reference, every
    gradient including dW_hr: the standard algorithm, which auto picks, and the
    persistent kernels (4 blocks of 2, 2, 2, 1 units and 1 or 3 of the P
    values each)."""
    problem = make_problem("lstm", 7, 5, 6, 7, np.float64, rng, proj=P, **SEMANTICS[semantics])
    out, cache, g = run("lstm", problem, "float32", algo)
    check(out, TOL["float32"])
    assert g["w_hr"].shape == (P, 7) and g["h0"].shape == (5, P) and g["c0"].shape == (5, 7)
    assert cache.P == P
    args, kw = problem[:2]
    dev = [to_device(a, "float32") for a in args[1:]]
    kw = {**kw, "w_hr": to_device(kw["w_hr"], "float32")}
    assert _device.forward("lstm", *dev, **kw, algo="auto")[3].algo == "standard"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("semantics", ["plain", "reverse_lengths", "batch_first_mask"])
def test_projection_16bit_matches_reference(semantics, dtype, rng):
    problem = make_problem("lstm", 7, 5, 6, 7, np.float64, rng, proj=4, **SEMANTICS[semantics])
    for algo in ALGOS:
        out, _, _ = run("lstm", problem, dtype, algo)
        check(out, TOL[dtype])


@pytest.mark.parametrize("algo", ALGOS)
def test_projection_products_cover_valid_steps_only(algo, rng):
    """With projection too, every product (the recurrent ones of width P, h = W_hr m,
    dm = dh W_hr, dW_hr) covers only the valid steps' rows, sorted lengths or not."""
    T, B, I, H, P = 7, 5, 6, 7, 3
    m = rng.random((T, B)) < 0.6
    cases = [{"lengths": np.array(n)} for n in ([7, 7, 3, 1, 0], [0, 2, 7, 1, 5])]
    cases += [{"mask": m}, {"mask": np.zeros((T, B), bool)}, {}]
    for case in cases:
        running = valid_steps(case, T, B).sum(axis=1).tolist()
        for reverse, batch_first in ((False, False), (True, True)):
            args, kw, dy, dh_n, dc_n = make_problem("lstm", T, B, I, H, np.float64, rng, proj=P,
                                                    reverse=reverse, batch_first=batch_first)
            kw.update(case)
            if batch_first and "mask" in case:
                kw["mask"] = case["mask"].T
            emu.take_gemm_log()
            out, _, _ = run("lstm", (args, kw, dy, dh_n, dc_n), "float32", algo)
            check(out, TOL["float32"])
            log = sorted(tuple(g) for g in emu.take_gemm_log())
            assert log == expected_gemms(algo, 4, I, H, running, P), (case, reverse)


def test_projection_inference_equals_training_forward(rng):
    args, kw, *_ = make_problem("lstm", 6, 4, 5, 7, np.float64, rng, proj=3, reverse=True,
                                lengths=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    kw["w_hr"] = to_device(kw["w_hr"], "float32")
    y1, h1, c1, _ = _device.forward("lstm", *dev, **kw)
    y2, h2, c2, none = _device.forward("lstm", *dev, **kw, training=False)
    assert none is None
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        assert np.array_equal(a.get(), b.get())


@pytest.mark.parametrize("T,B", [(0, 3), (4, 0)])
def test_projection_empty(T, B, rng):
    problem = make_problem("lstm", T, B, 3, 4, np.float64, rng, proj=2)
    out, _, _ = run("lstm", problem, "float32", "standard")
    check(out, TOL["float32"])


def test_projection_cache_nbytes(rng):
    """The projected cache: w_hh [4H, P] and the states [N, P], plus w_hr and each
    valid step's o * tanh(c) [R, H]."""
    T, B, I, H, P = 5, 3, 4, 6, 2
    args, kw, *_ = make_problem("lstm", T, B, I, H, np.float64, rng, proj=P, lengths=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    kw["w_hr"] = to_device(kw["w_hr"], "float32")
    cache = _device.forward("lstm", *dev, **kw)[3]
    a = lambda n: -(-n // 256) * 256  # noqa: E731
    N, R, GH = T * B, int(valid_steps(kw, T, B).sum()), 4 * H
    expect = (a(R * I * 4) + a(GH * I * 4) + a(GH * P * 4) + a(P * H * 4) + a(N * P * 4)
              + a(N * H * 4) + a(N * 4 * H * 4) + a(R * H * 4) + a(B * H * 4) + a(B * 4))
    assert cache.nbytes == expect


def test_projection_errors(rng):
    """Bad projection arguments on the device: the CPU's messages, naming the argument."""
    T, B, I, H, P = 3, 2, 4, 5, 2
    d = lambda *s: fusedrnn.DeviceArray.from_host(np.zeros(s, np.float32))  # noqa: E731
    x, w_ih, w_hh, w_hr = d(T, B, I), d(4 * H, I), d(4 * H, P), d(P, H)
    with pytest.raises(ValueError, match="w_hr .*only used by cell 'lstm'"):
        _device.forward("gru", x, d(3 * H, I), d(3 * H, P), w_hr=w_hr)
    with pytest.raises(ValueError, match=r"w_hh must have shape \[4\*H, P\]"):
        _device.forward("lstm", x, w_ih, d(4 * H, H), w_hr=w_hr)
    with pytest.raises(ValueError, match=r"h0 must have shape \[B, P\]"):
        _device.forward("lstm", x, w_ih, w_hh, h0=d(B, H), w_hr=w_hr)
    with pytest.raises(ValueError, match=r"c0 must have shape \[B, H\]"):
        _device.forward("lstm", x, w_ih, w_hh, c0=d(B, P), w_hr=w_hr)
    with pytest.raises(TypeError, match="w_hr is a host array"):
        _device.forward("lstm", x, w_ih, w_hh, w_hr=np.zeros((P, H), np.float32))
    *_, cache = _device.forward("lstm", x, w_ih, w_hh, w_hr=w_hr)
    with pytest.raises(ValueError, match=r"dy must have shape \[T, B, P\]"):
        fusedrnn.backward(cache, d(T, B, H))
    with pytest.raises(ValueError, match=r"dh_n must have shape \[B, P\]"):
        fusedrnn.backward(cache, None, d(B, H))


# ------------------------------------------------------------- checkpoint


def run_all(cell, problem, dtype="float32", **fkw):
    """y, h_n, c_n and every gradient of forward(**fkw) + backward, as host arrays."""
    args, kw, dy, dh_n, dc_n = problem
    dev = [to_device(a, dtype) for a in args[1:]]
    kw = {**kw, "w_hr": to_device(kw.get("w_hr"), dtype)}
    y, h_n, c_n, cache = _device.forward(cell, *dev, **kw, **fkw)
    g = fusedrnn.backward(cache, *[to_device(a, dtype) for a in (dy, dh_n, dc_n)])
    return {"y": host(y), "h_n": host(h_n), "c_n": host(c_n),
            **{"d" + k: host(g[k]) for k in GRADS}}, cache


def assert_same(a, b, label):
    for k in a:
        assert (a[k] is None) == (b[k] is None), (label, k)
        if a[k] is not None:
            assert np.array_equal(a[k], b[k]), (label, k, rel_err(b[k], a[k]))


#: (cell, P, semantics, algo): the standard algorithm everywhere; the persistent
#: kernels (slow to emulate, tenfold under AddressSanitizer) on four, one projected
CHECKPOINT_CASES = (
    [(c, P, sem, "standard") for c, P in (("lstm", 0), ("gru", 0), ("rnn_tanh", 0), ("lstm", 3))
     for sem in SEMANTICS]
    + [("lstm", 0, "reverse_lengths", "persistent"), ("gru", 0, "batch_first_mask", "persistent"),
       ("lstm", 0, "no_h0", "persistent"), ("lstm", 3, "batch_first_lengths", "persistent")])


@pytest.mark.parametrize("cell,P,semantics,algo", CHECKPOINT_CASES,
                         ids=[f"{c}{'_projection' if P else ''}-{sem}-{a}"
                              for c, P, sem, a in CHECKPOINT_CASES])
def test_checkpoint_equals_full_cache(cell, P, semantics, algo, rng):
    """checkpoint=k keeps the state every k steps and backward recomputes each segment
    with the forward's own algorithm, kernels and products: on the emulator (whose
    products do not depend on how many rows they cover) outputs and gradients are
    bitwise those of the full cache, for k = 1, 2, 3, T, more than T and True
    (ceil(sqrt(T)) = 3), with a smaller cache; and they match the reference."""
    T = 7
    ks = ((1, 1), (2, 2), (3, 3), (T, T), (T + 2, T + 2), (True, 3))
    if algo == "persistent":  # (its emulation is slow: segments of 2, 2, 2 and 1 steps)
        ks = ((2, 2),)
    problem = make_problem(cell, T, 5, 6, 7, np.float64, rng, proj=P, **SEMANTICS[semantics])
    full, full_cache = run_all(cell, problem, algo=algo)
    assert full_cache.checkpoint == 0
    out, _, _ = run(cell, problem, "float32", algo)
    check({k: (full[k], r) for k, (_, r) in out.items()}, TOL["float32"])
    for k, want_k in ks:
        got, cache = run_all(cell, problem, checkpoint=k, algo=algo)
        assert (cache.checkpoint, cache.algo) == (want_k, algo)
        assert cache.nbytes < full_cache.nbytes
        assert_same(full, got, k)
    if algo == "standard" and not P and semantics == "plain":
        # auto picks what it would without checkpoint (B = 5: persistent)
        assert emu.choose_algo(cell, "float32", T, 5, 6, 7, 0) == "persistent"
        assert run_all(cell, problem, checkpoint=2)[1].algo == "persistent"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_checkpoint_16bit_equals_full_cache(dtype, rng):
    """The kept states are those of the array type (h) and float32 (c): the
    recomputation starts from exactly what forward had."""
    for cell, semantics, P, algo in (("lstm", "reverse_lengths", 0, "persistent"),
                                     ("gru", "batch_first_mask", 0, "standard"),
                                     ("lstm", "mask", 4, "standard")):
        problem = make_problem(cell, 7, 5, 6, 7, np.float64, rng, proj=P, **SEMANTICS[semantics])
        full, _ = run_all(cell, problem, dtype, algo=algo)
        got, _ = run_all(cell, problem, dtype, checkpoint=3, algo=algo)
        assert_same(full, got, (cell, semantics))


def test_checkpoint_products_cover_valid_steps_only(rng):
    """The recomputation runs, per segment, one input projection over the segment's
    valid rows and (standard algorithm) each step's products over its running rows,
    nothing else; forward and the deferred products are the full cache's. (The
    persistent kernels multiply inside: only the segment's input projections are
    added.)"""
    T, B, I, H, k = 7, 5, 6, 7, 3
    for cell, P, case in (("lstm", 0, {"lengths": np.array([0, 2, 7, 1, 5])}),
                          ("gru", 0, {"mask": rng.random((T, B)) < 0.6}),
                          ("lstm", 3, {}), ("rnn_tanh", 0, {"lengths": np.array([7, 7, 3, 1, 0])})):
        G = fusedrnn.CELLS[cell]
        running = valid_steps(case, T, B).sum(axis=1).tolist()
        for reverse in (False, True):
            args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, np.float64, rng, proj=P,
                                                    reverse=reverse)
            kw.update(case)
            emu.take_gemm_log()
            run_all(cell, (args, kw, dy, dh_n, dc_n), checkpoint=k, algo="standard")
            log = sorted(tuple(g) for g in emu.take_gemm_log())
            order = running[::-1] if reverse else running  # processing order
            segments = [order[s:s + k] for s in range(0, T, k)]
            extra = [(G * H, sum(seg), I) for seg in segments if sum(seg)]
            extra += [(G * H, n, P or H) for n in running if n]
            extra += [(P, n, H) for n in running if n] if P else []
            assert log == sorted(expected_gemms("standard", G, I, H, running, P) + extra), \
                (cell, case, reverse)


def test_checkpoint_cache_nbytes(rng):
    """The checkpointed cache: x's valid rows, the weights, the biases, and h (array
    type) and c (float32) entering steps 0, k, 2k, ...: ceil(T/k) states."""
    T, B, I, H, P = 7, 3, 4, 6, 2
    a = lambda n: -(-n // 256) * 256  # noqa: E731
    for cell, proj, k in (("lstm", 0, 3), ("lstm", P, 2), ("gru", 0, 7), ("rnn_tanh", 0, 1)):
        args, kw, *_ = make_problem(cell, T, B, I, H, np.float64, rng, proj=proj, lengths=True)
        dev = [to_device(x, "float32") for x in args[1:]]
        kw["w_hr"] = to_device(kw.get("w_hr"), "float32")
        cache = _device.forward(cell, *dev, **kw, checkpoint=k)[3]
        G, S = fusedrnn.CELLS[cell], proj or H
        R, kept = int(valid_steps(kw, T, B).sum()), -(-T // k)
        expect = (a(R * I * 4) + a(G * H * I * 4) + a(G * H * S * 4) + a(S * H * 4 if proj else 0)
                  + 2 * a(G * H * 4) + a(kept * B * S * 4)
                  + a(kept * B * H * 4 if cell == "lstm" else 0) + a(B * 4))
        assert cache.nbytes == expect, (cell, proj, k)


def test_checkpoint_wanted_gradients_and_repeated_backward(rng):
    """need_x / need_h0 / need_c0 with a checkpointed cache: the gradients wanted are
    bitwise those of a backward computing all; a second backward gives the same."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 7, 5, 6, 7, np.float64, rng,
                                            reverse=True, mask=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    cache = _device.forward("lstm", *dev, **kw, checkpoint=2)[3]
    assert cache.algo == "persistent"  # (auto; its segments' last products, dh0 or not)
    grads_in = [to_device(a, "float32") for a in (dy, dh_n, dc_n)]
    full = {k: host(v) for k, v in fusedrnn.backward(cache, *grads_in).items()}
    again = {k: host(v) for k, v in fusedrnn.backward(cache, *grads_in).items()}
    assert_same(full, again, "again")
    for need in NEEDS:
        g = fusedrnn._backward(cache, *grads_in, *need)
        assert_wanted_gradients(g, full, need, GRADS, "checkpoint", host)


def test_checkpoint_arguments(rng):
    """checkpoint is checked as on the CPU (even for inference, where it has no effect)."""
    args, kw, *_ = make_problem("gru", 4, 3, 2, 5, np.float64, rng)
    dev = [to_device(a, "float32") for a in args[1:]]
    for bad, exc in ((0, ValueError), (-2, ValueError), ("yes", TypeError), (1.5, TypeError)):
        for training in (True, False):
            with pytest.raises(exc, match="checkpoint must be a bool or a positive int"):
                _device.forward("gru", *dev, **kw, checkpoint=bad, training=training)
    y, _, _, none = _device.forward("gru", *dev, **kw, checkpoint=2, training=False)
    assert none is None
    assert np.array_equal(y.get(), _device.forward("gru", *dev, **kw, training=False)[0].get())


# ------------------------------------------------------------- benchmark mode

#: emulated milliseconds that make a variant lose benchmark mode's timing, added
#: to the events' clock per cooperative launch (the persistent kernels in grid
#: mode), per cluster launch, or per GEMM (the standard algorithm runs one a step)
DELAYS = {"grid": "FUSEDRNN_EMU_COOP_DELAY_MS", "cluster": "FUSEDRNN_EMU_CLUSTER_DELAY_MS",
          "standard": "FUSEDRNN_EMU_GEMM_DELAY_MS"}
VARIANTS = tuple(DELAYS)


def slow(monkeypatch, *variants):
    """Make the given variants ("persistent": grid and cluster) the slow ones, and no other."""
    names = {v for x in variants for v in (("grid", "cluster") if x == "persistent" else (x,))}
    for v, env in DELAYS.items():
        if v in names:
            monkeypatch.setenv(env, "100000")
        else:
            monkeypatch.delenv(env, raising=False)


@pytest.fixture
def tuning():
    """Benchmark mode's decisions, forgotten before and after the test."""
    emu.benchmark_clear()
    yield
    emu.benchmark_clear()


def table():
    return {e["pass"]: e for e in emu.benchmark_table()}


def variant(e):
    """The variant a table entry picked."""
    return "standard" if e["algo"] == "standard" else "cluster" if e["cluster"] else "grid"


@pytest.mark.parametrize("fast", VARIANTS)
def test_benchmark_mode_keeps_the_fastest_variant(fast, tuning, monkeypatch, rng):
    """The first call times the three variants and returns the winner's results
    (bitwise those of a plain call with that algorithm), forward and backward;
    later calls run the winner without timing again."""
    problem = make_problem("lstm", 6, 4, 5, 7, np.float64, rng, lengths=True)
    plain = {a: run_all("lstm", problem, algo=a)[0] for a in ALGOS}
    # (the algorithms' sums differ in order, so a run of the wrong one would show)
    assert not np.array_equal(plain["standard"]["y"], plain["persistent"]["y"])
    assert not np.array_equal(plain["standard"]["dw_hh"], plain["persistent"]["dw_hh"])
    algo = "standard" if fast == "standard" else "persistent"
    assert all(lay["ok"] for lay in layouts("lstm", "float32", 4, 7))
    slow(monkeypatch, *(v for v in VARIANTS if v != fast))
    emu.take_gemm_log()
    got, cache = run_all("lstm", problem, algo="benchmark")
    first_log = emu.take_gemm_log()
    assert cache.algo == algo
    assert_same(plain[algo], got, "first call")
    t = table()
    assert set(t) == {"forward+cache", "backward"}
    for e in t.values():
        assert variant(e) == fast, e
        for v in VARIANTS:
            if v != fast:
                assert e["ms_" + ("persistent" if v == "grid" else v)] >= \
                    e["ms_" + ("persistent" if fast == "grid" else fast)] + 9e4, e
        assert (e["cell"], e["dtype"], e["T"], e["B"], e["I"], e["H"], e["P"]) == \
            ("lstm", "float32", 6, 4, 5, 7, 7)
        assert (e["lengths"], e["mask"], e["reverse"], e["checkpoint"]) == (True, False, False, 0)
    # again: no timing (the products are those of one plain call)
    run_all("lstm", problem, algo=algo)
    one_log = emu.take_gemm_log()
    assert len(first_log) > len(one_log)
    again, cache = run_all("lstm", problem, algo="benchmark")
    assert sorted(emu.take_gemm_log()) == sorted(one_log)
    assert cache.algo == algo
    assert_same(plain[algo], again, "second call")
    assert table() == t


def test_benchmark_mode_leaves_out_what_does_not_fit(tuning, monkeypatch, rng):
    """A cluster that cannot hold W_hh is no candidate (ms_cluster -1); grid mode is."""
    # (4 emulated multiprocessors: a cluster has 4 blocks, as the grid; FUSEDRNN_EMU_SMEM
    # as small_smem's lets the grid's blocks stage the batch in parts, which a cluster cannot)
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", str(small_smem("float32", 20, 16)))
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    lay = layouts("lstm", "float32", 20, 16)
    assert all(x["ok"] and not x["cluster"] for x in lay), lay
    slow(monkeypatch, "standard")
    problem = make_problem("lstm", 4, 20, 3, 16, np.float64, rng)
    out, cache, _ = run("lstm", problem, "float32", "benchmark")
    check(out, TOL["float32"])
    for e in table().values():
        assert variant(e) == "grid" and e["ms_cluster"] == -1 and e["ms_standard"] > 1e5, e


def test_benchmark_mode_tunes_backward_apart(tuning, monkeypatch, rng):
    """Backward is timed on its own: here forward keeps the standard algorithm
    and backward the persistent kernel (no per-step products backward), with
    the reference's gradients; inference and training forward are separate keys."""
    T, B, I, H = 6, 4, 5, 7
    args, kw, dy, dh_n, dc_n = make_problem("gru", T, B, I, H, np.float64, rng, reverse=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    slow(monkeypatch, "persistent")
    y, h_n, _, cache = _device.forward("gru", *dev, **kw, algo="benchmark")
    _device.forward("gru", *dev, **kw, training=False, algo="benchmark")
    slow(monkeypatch, "standard")
    emu.take_gemm_log()
    g = fusedrnn.backward(cache, to_device(dy, "float32"), to_device(dh_n, "float32"))
    t = table()
    assert {p: e["algo"] for p, e in t.items()} == {
        "forward+cache": "standard", "forward": "standard", "backward": "persistent"}
    assert cache.algo == "standard"
    emu.take_gemm_log()
    g2 = fusedrnn.backward(cache, to_device(dy, "float32"), to_device(dh_n, "float32"))
    log = emu.take_gemm_log()
    assert len(log) == 3, log  # dx, dW_ih, dW_hh only: the steps ran in the persistent kernel
    ry, rh_n, _, rcache = reference.forward("gru", *[rounded(a, "float32") for a in args[1:]], **kw)
    rg = reference.backward(rcache, rounded(dy, "float32"), rounded(dh_n, "float32"))
    check({"y": (host(y), ry), "h_n": (host(h_n), rh_n),
           **{"d" + k: (host(g[k]), rg[k]) for k in GRADS}}, TOL["float32"])
    for k in GRADS:
        if g[k] is not None:
            assert np.array_equal(g[k].get(), g2[k].get()), k


@pytest.mark.parametrize("fwd,bwd", [("grid", "standard"), ("standard", "cluster"),
                                     ("cluster", "grid")])  # (each variant in each role)
def test_benchmark_mode_checkpointed(fwd, bwd, tuning, monkeypatch, rng):
    """With checkpoint=k the recomputation runs forward's variant and the
    backward steps the one timed for backward: the results are bitwise those of
    the full cache with the same two variants, and the reference's."""
    args, kw, dy, dh_n, dc_n = problem = make_problem("lstm", 5, 3, 4, 5, np.float64, rng,
                                                      mask=True)
    dev = [to_device(a, "float32") for a in args[1:]]
    got = {}
    for k in (False, 2):
        slow(monkeypatch, *(v for v in VARIANTS if v != fwd))
        y, h_n, c_n, cache = _device.forward("lstm", *dev, **kw, checkpoint=k, algo="benchmark")
        slow(monkeypatch, *(v for v in VARIANTS if v != bwd))
        g = fusedrnn.backward(cache, *[to_device(a, "float32") for a in (dy, dh_n, dc_n)])
        slow(monkeypatch)
        # a second backward (decided now): the recomputation's launches are forward's
        # variant, the backward steps' backward's (3 segments of 2, 2, 1 steps)
        emu.take_launch_log()
        g2 = fusedrnn.backward(cache, *[to_device(a, "float32") for a in (dy, dh_n, dc_n)])
        kinds = {"standard": [], "grid": ["grid"], "cluster": ["cluster"]}
        want = kinds[bwd] if not k else (kinds[fwd] + kinds[bwd]) * 3
        assert emu.take_launch_log() == want
        assert_same({n: host(g[n]) for n in GRADS}, {n: host(g2[n]) for n in GRADS}, "again")
        assert cache.checkpoint == int(k)
        assert cache.algo == ("standard" if fwd == "standard" else "persistent")
        got[k] = {"y": host(y), "h_n": host(h_n), "c_n": host(c_n),
                  **{"d" + n: host(g[n]) for n in GRADS}}
    t = {(e["pass"], e["checkpoint"]): variant(e) for e in emu.benchmark_table()}
    assert t == {("forward+cache", 0): fwd, ("backward", 0): bwd,
                 ("forward+cache", 2): fwd, ("backward", 2): bwd}
    assert_same(got[False], got[2], "checkpoint=2")
    ref, _, _ = run("lstm", problem, "float32", "standard")
    check({k: (got[2][k], r) for k, (_, r) in ref.items()}, TOL["float32"])


def test_benchmark_mode_without_a_choice_or_while_capturing(tuning, monkeypatch, rng):
    """A projected LSTM chooses between the standard algorithm and grid mode
    (no cluster mode); nothing is timed when only the standard algorithm can
    run (W_hh does not fit) or when the stream is being captured into a graph
    (then auto's pick runs); results stay the reference's."""
    problem = make_problem("lstm", 5, 3, 4, 6, np.float64, rng, proj=3)
    slow(monkeypatch, "standard")
    out, cache, _ = run("lstm", problem, "float32", "benchmark")
    check(out, TOL["float32"])
    assert cache.algo == "persistent" and set(table()) == {"forward+cache", "backward"}
    for e in table().values():
        assert variant(e) == "grid" and e["ms_cluster"] == -1, e
    slow(monkeypatch)
    emu.benchmark_clear()
    monkeypatch.setenv("FUSEDRNN_EMU_SMEM", "256")
    assert not any(lay["ok"] for lay in layouts("lstm", "float32", 3, 6))
    problem = make_problem("lstm", 5, 3, 4, 6, np.float64, rng)
    out, cache, _ = run("lstm", problem, "float32", "benchmark")
    check(out, TOL["float32"])
    assert cache.algo == "standard" and emu.benchmark_table() == []
    monkeypatch.delenv("FUSEDRNN_EMU_SMEM")
    monkeypatch.setenv("FUSEDRNN_EMU_CAPTURING", "1")
    problem = make_problem("rnn_tanh", 5, 3, 4, 6, np.float64, rng)
    out, cache, _ = run("rnn_tanh", problem, "float32", "benchmark")
    check(out, TOL["float32"])
    assert cache.algo == emu.choose_algo("rnn_tanh", "float32", 5, 3, 4, 6, 0) == "persistent"
    assert emu.benchmark_table() == []
    monkeypatch.delenv("FUSEDRNN_EMU_CAPTURING")
    run("rnn_tanh", problem, "float32", "benchmark")
    assert len(emu.benchmark_table()) == 2


def test_benchmark_mode_from_the_environment(tuning, monkeypatch, rng):
    """FUSEDRNN_CUDA_ALGO=benchmark turns it on; a wrong value names the choices."""
    args, kw, *_ = make_problem("gru", 4, 2, 3, 5, np.float64, rng)
    dev = [to_device(a, "float32") for a in args[1:]]
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "benchmark")
    _device.forward("gru", *dev, **kw, training=False)
    assert [e["pass"] for e in emu.benchmark_table()] == ["forward"]
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "fastest")
    with pytest.raises(ValueError, match="benchmark"):
        _device.forward("gru", *dev, **kw, training=False)

"""Robustness of the compiled backend: fork, leaks, long sequences, numerics, memory."""

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fusedrnn
from fusedrnn import reference

from conftest import GRAD_KEYS, TOL, assert_close, make_problem, padded


def _child_forward(queue):
    args, kw, *_ = make_problem("lstm", 30, 16, 32, 64, np.float32, np.random.default_rng(0))
    y = fusedrnn.forward(*args, **kw, training=False)[0]
    queue.put(float(np.abs(y).sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
# JAX, when tests/test_jax.py imported it into this process, warns at every fork that its
# own threads make forking unsafe; the child runs fusedrnn alone, no JAX.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_pool_survives_fork():
    """A child forked after the thread pool ran can still run (no deadlock)."""
    old = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(2)
    try:
        args, kw, *_ = make_problem("lstm", 30, 16, 32, 64, np.float32, np.random.default_rng(0))
        expected = float(np.abs(fusedrnn.forward(*args, **kw, training=False)[0]).sum())
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_forward, args=(queue,))
        proc.start()
        proc.join(60)
        alive = proc.is_alive()
        if alive:
            proc.kill()
        assert not alive, "child hung after fork"
        assert proc.exitcode == 0
        assert queue.get(timeout=5) == expected
    finally:
        fusedrnn.set_num_threads(old)


def _cpus_allowed(task: str) -> str:
    with open(f"/proc/self/task/{task}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for task {task}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and 2 CPUs")
def test_pool_workers_are_not_left_bound_to_one_cpu():
    """Before waking a worker the pool binds it to one CPU, to steer the wake-up away
    from the caller's CPU (csrc/cpu/pool.h); the worker widens its binding again as it
    starts. After a call every thread may run wherever the caller may."""
    old = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(2)
    try:
        # B * G * H * H >= 2^16: the call runs on 2 threads
        args, kw, *_ = make_problem("lstm", 5, 4, 32, 128, np.float32, np.random.default_rng(0))
        for _ in range(3):
            time.sleep(0.01)  # over 100 us since the pool's last job: the placement runs
            fusedrnn.forward(*args, **kw, training=False)
        main = _cpus_allowed(str(threading.get_native_id()))
        masks = {t: _cpus_allowed(t) for t in os.listdir("/proc/self/task")}
        assert len(masks) >= 2
        assert all(m == main for m in masks.values()), (main, masks)
    finally:
        fusedrnn.set_num_threads(old)


_OPENMP_SCRIPT = """
import os, sys, time
import numpy as np
sys.path.insert(0, {tests!r})
import fusedrnn
from fusedrnn import _core
from conftest import make_problem
from test_robustness import _cpus_allowed

fusedrnn.set_num_threads(2)
# B * G * H * H >= 2^16 and over 2^20 multiply-adds: every call runs on 2 threads
args, kw, dy, dh_n, dc_n = make_problem("lstm", 5, 4, 32, 128, np.float32,
                                        np.random.default_rng(0))

def run():
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    return [y, h_n, c_n] + list(fusedrnn.backward(cache, dy, dh_n, dc_n).values())

def same(a, b):
    return all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a, b))

own = run()
assert _core.threads_backend() == "fusedrnn", _core.threads_backend()
import torch
torch.set_num_threads(2)
(torch.ones(2000, 2000) @ torch.ones(2000, 2000)).sum()  # OpenMP's threads, now spinning
omp = run()
assert _core.threads_backend() == {backend!r}, _core.threads_backend()
assert same(own, omp)
for _ in range(3):  # over 100 us apart: the wake-up placement binds threads, which unbind
    time.sleep(0.01)
    run()
main = _cpus_allowed(str(os.getpid()))
assert all(_cpus_allowed(t) == main for t in os.listdir("/proc/self/task")), "a thread left bound"
pid = os.fork()
if pid == 0:  # OpenMP is not usable after fork: the child runs on fusedrnn's threads
    ok = same(run(), own) and _core.threads_backend() == "fusedrnn"
    os._exit(0 if ok else 3)
assert os.waitpid(pid, 0)[1] == 0, "the forked child failed"
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux, 2 CPUs")
@pytest.mark.parametrize("env", ["default", "FUSEDRNN_OPENMP=0"])
def test_jobs_run_on_openmp_threads_once_loaded(env):
    """With an OpenMP runtime in the process (torch's), calls run on its threads, not on
    fusedrnn's pool (csrc/cpu/pool.h), with bitwise the same results; no thread is left
    bound to one CPU by the wake-up placement; a forked child runs on fusedrnn's own
    threads; FUSEDRNN_OPENMP=0 keeps fusedrnn's pool. In a fresh process, which loads
    torch halfway."""
    pytest.importorskip("torch")
    environ = dict(os.environ)
    environ.pop("FUSEDRNN_OPENMP", None)
    if env != "default":
        environ["FUSEDRNN_OPENMP"] = "0"
    tests = os.path.dirname(os.path.abspath(__file__))
    code = _OPENMP_SCRIPT.format(tests=tests,
                                 backend="openmp" if env == "default" else "fusedrnn")
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_repeated_calls_do_not_leak():
    args, kw, dy, dh_n, dc_n = make_problem("gru", 20, 8, 16, 32, np.float32,
                                            np.random.default_rng(1), lengths=True)

    def calls(n):
        for _ in range(n):
            _, _, _, cache = fusedrnn.forward(*args, **kw)
            fusedrnn.backward(cache, dy, dh_n, dc_n)

    calls(500)  # warm up: workspace cache, allocator pools
    before = _rss_bytes()
    calls(10_000)
    grown = _rss_bytes() - before
    print(f"RSS grew by {grown / 2**20:.2f} MiB over 10,000 forward+backward calls")
    assert grown < 4 * 2**20


def test_workspace_cache_is_bounded_and_releasable():
    args, kw, *_ = make_problem("lstm", 50, 32, 64, 128, np.float32, np.random.default_rng(2))
    fusedrnn.forward(*args, **kw)
    limit = fusedrnn._core.workspace_keep_limit()
    assert limit >= 256 * 2**20
    assert 0 < fusedrnn._core.workspace_cached_bytes() <= limit
    fusedrnn._core.workspace_release()
    assert fusedrnn._core.workspace_cached_bytes() == 0


_LARGE_STEP = """
import resource, numpy as np, fusedrnn
core = fusedrnn._core
rng = np.random.default_rng(0)
T, B, H = 100, 4096, 32
r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
x, w_ih, w_hh, b_ih, b_hh, dy = r(T, B, H), r(3 * H, H), r(3 * H, H), r(3 * H), r(3 * H), r(T, B, H)
def step():
    cache = fusedrnn.forward("gru", x, w_ih, w_hh, b_ih, b_hh)[3]
    fusedrnn.backward(cache, dy)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = core.workspace_keep_limit()
core.workspace_reset_peak()
f0 = faults()
step()
first = faults() - f0
peak = core.workspace_peak_bytes()
f0 = faults()
step()
print(before, core.workspace_keep_limit(), peak, first, faults() - f0)
"""


def _memory_bytes():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


@pytest.mark.skipif(sys.platform != "linux", reason="page-fault counts as on Linux")
@pytest.mark.skipif(_memory_bytes() < 4 * 2**30,
                    reason="the keep limit, at most a quarter of the memory, would be under "
                           "the step's 650 MiB")
def test_workspace_keeps_what_a_large_step_needs():
    """A training step of more than 256 MiB (GRU T = 100, B = 4096, H = 32: a 314 MiB
    cache, gate gradients and dx besides) raises the keep limit to what it had alive at
    once, so the next step takes its blocks back instead of faulting in fresh pages. In a
    fresh process, so the limit starts at 256 MiB."""
    out = subprocess.run([sys.executable, "-c", _LARGE_STEP], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, peak, first, second = map(int, out.stdout.split())
    print(f"keep limit {before / 2**20:.0f} -> {after / 2**20:.0f} MiB, working memory "
          f"{peak / 2**20:.0f} MiB; page faults {first} then {second}")
    assert before == 256 * 2**20
    assert after >= peak > 256 * 2**20
    assert first * os.sysconf("SC_PAGE_SIZE") > peak // 2  # the first step's pages are new
    assert second < first // 20


def test_very_long_sequence_runs():
    """T = 100,000 steps: no recursion, no per-step allocation growth."""
    T = 100_000
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, 1, 2)).astype(np.float32)
    w_ih = (rng.standard_normal((8, 2)) * 0.3).astype(np.float32)
    w_hh = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    y, h_n, _, cache = fusedrnn.forward("rnn_tanh", x, w_ih, w_hh)
    g = fusedrnn.backward(cache, np.ones_like(y))
    assert np.isfinite(y).all() and all(np.isfinite(g[k]).all() for k in ("x", "w_hh"))
    np.testing.assert_array_equal(h_n, y[-1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float32_long_sequence_accuracy(cell):
    """float32 over T = 10,000 stays within DESIGN.md's float32 tolerance of float64."""
    args, kw, dy, dh_n, dc_n = make_problem(cell, 10_000, 2, 4, 8, np.float64,
                                            np.random.default_rng(4), scale=0.3)
    y64, h64, c64, cache64 = reference.forward(*args, **kw)
    g64 = reference.backward(cache64, dy, dh_n, dc_n)
    f32 = lambda a: a.astype(np.float32) if isinstance(a, np.ndarray) else a  # noqa: E731
    y32, h32, c32, cache32 = fusedrnn.forward(*[f32(a) for a in args], **kw)
    g32 = fusedrnn.backward(cache32, f32(dy), f32(dh_n), f32(dc_n))
    assert_close("y", y32, y64, TOL[np.float32])
    assert_close("h_n", h32, h64, TOL[np.float32])
    for k in GRAD_KEYS:
        assert_close("d" + k, g32[k], g64[k], TOL[np.float32])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", list(fusedrnn.CELLS))
def test_huge_preactivations_saturate(cell, dtype):
    """Pre-activations of +-1e4 give finite outputs and gradients (no exp overflow NaN)."""
    rng = np.random.default_rng(5)
    G, T, B, I, H = fusedrnn.CELLS[cell], 6, 3, 4, 5
    x = rng.choice([-1.0, 1.0], size=(T, B, I)).astype(dtype)
    w_ih = (rng.choice([-1.0, 1.0], size=(G * H, I)) * 2.5e3).astype(dtype)
    w_hh = (rng.standard_normal((G * H, H))).astype(dtype)
    y, h_n, c_n, cache = fusedrnn.forward(cell, x, w_ih, w_hh)
    g = fusedrnn.backward(cache, np.ones_like(y), np.ones_like(h_n),
                          None if c_n is None else np.ones_like(c_n))
    assert np.isfinite(y).all() and np.isfinite(h_n).all()
    for k in GRAD_KEYS:
        assert g[k] is None or np.isfinite(g[k]).all(), k
    ry = reference.forward(cell, x, w_ih, w_hh, training=False)[0]
    assert_close("y", y, ry, TOL[dtype] if cell != "rnn_relu" else 1e-4)


@pytest.mark.parametrize("cell", list(fusedrnn.CELLS))
def test_nan_in_one_row_stays_in_that_row(cell):
    args, kw, dy, dh_n, dc_n = make_problem(cell, 8, 6, 5, 9, np.float64,
                                            np.random.default_rng(6))
    x = args[1].copy()
    x[3, 2, 1] = np.nan  # row 2 only
    args[1] = x
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    others = [b for b in range(6) if b != 2]
    assert np.isfinite(y[:, others]).all() and np.isfinite(h_n[others]).all()
    assert np.isnan(y[3:, 2]).any()
    assert np.isfinite(g["x"][:, others]).all() and np.isfinite(g["h0"][others]).all()


@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 3)])
def test_cache_size_formula(cell, proj):
    """cache.nbytes = itemsize * (N*(I + Pp + G*Hp + E + Mp) + G*Hp*I + G*H*P + P*H*[proj])
    + bookkeeping, with H, P padded to the SIMD width (docs/memory.md)."""
    T, B, I, H = 9, 5, 7, 13
    args, kw, *_ = make_problem(cell, T, B, I, H, np.float32, np.random.default_rng(7),
                                lengths=True, proj=proj)
    _, _, _, cache = fusedrnn.forward(*args, **kw)
    N = int(np.sum(kw["lengths"]))
    G, P = fusedrnn.CELLS[cell], proj or H
    Hp, Pp = padded(H), padded(P)
    E = {"lstm": 2 * Hp, "gru": Hp}.get(cell, 0) + (Hp if proj else 0)
    floats = N * (I + Pp + G * Hp + E) + G * Hp * I + G * H * P + (P * H if proj else 0)
    bookkeeping = 8 * (B + 2 * T)  # row order and per-step counts, int64
    assert cache.nbytes == 4 * floats + bookkeeping


@pytest.mark.parametrize("H", [16, 13])
@pytest.mark.parametrize("cell,proj", [("gru", 0), ("lstm", 3)])
def test_shared_weights_are_held_by_the_cache(cell, proj, H):
    """forward with share_weights (fusedrnn.torch's eager training): the cache refers to
    the weight arrays instead of copying them, holds them alive, and gives the same
    gradients bitwise; its nbytes leaves them out. H = 13 needs padded W_ih rows, so
    W_ih is still copied there. Checked with the caller's only references dropped and
    the freed memory's likely successors filled with other values."""
    import gc

    T, B, I = 4, 3, 16
    args, kw, dy, dh_n, dc_n = make_problem(cell, T, B, I, H, np.float32,
                                            np.random.default_rng(11), proj=proj)
    _, _, _, plain = fusedrnn.forward(*args, **kw)
    want = fusedrnn.backward(plain, dy, dh_n, dc_n)
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    kw = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    y, _, _, shared = fusedrnn._forward(*args, **kw, share_weights=True)
    sizes = [a.nbytes for a in (args[2], args[3], kw.get("w_hr")) if a is not None]
    del args[2:4]
    kw.pop("w_hr", None)
    gc.collect()
    junk = [np.full(n // 4, np.nan, np.float32) for n in sizes for _ in range(4)]
    got = fusedrnn.backward(shared, dy, dh_n, dc_n)
    for k in GRAD_KEYS:
        if want.get(k) is not None:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    Hp = padded(H)
    kept_ih = Hp != H  # W_ih copied (padded) unless H fills whole unit blocks
    G, P = fusedrnn.CELLS[cell], proj or H
    left_out = 4 * (G * H * P + P * H * bool(proj) + (0 if kept_ih else G * Hp * I))
    assert plain.nbytes - shared.nbytes == left_out
    del junk


def test_result_arrays_are_independent():
    """Results of 128 KiB or more live in fusedrnn's kept blocks (output_alloc), reused
    once an array is freed: every array is its own memory while it lives, writable,
    C-contiguous, and survives the cache, the call and later calls unchanged."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 64, 16, 256, 256, np.float32,
                                            np.random.default_rng(12))
    y, h_n, _, cache = fusedrnn.forward(*args, **kw)
    assert y.nbytes >= 2**20 and y.flags.c_contiguous and y.flags.writeable
    assert not y.flags.owndata and y.base is not None  # a kept block, owned by its capsule
    first = fusedrnn.backward(cache, dy, dh_n, dc_n)
    keep = {k: v.copy() for k, v in first.items() if v is not None}
    big = [k for k, v in keep.items() if v.nbytes >= 2**17]
    assert "w_hh" in big and "x" in big
    second = fusedrnn.backward(cache, dy, dh_n, dc_n)
    for k in big:
        assert not np.shares_memory(first[k], second[k]), k
        second[k][...] = np.nan
    del cache, second
    third = fusedrnn.backward(fusedrnn.forward(*args, **kw)[3], dy, dh_n, dc_n)
    for k, v in keep.items():
        np.testing.assert_array_equal(first[k], v, err_msg=k)
        np.testing.assert_array_equal(third[k], v, err_msg=k)
    assert np.all(np.isfinite(y))


_STEP_FAULTS = """
import resource, sys
import numpy as np
import fusedrnn
cell, G, H = sys.argv[1], int(sys.argv[2]), 256
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 1, H), dtype=np.float32)
w_ih = rng.standard_normal((G * H, H), dtype=np.float32) * 0.05
w_hh = rng.standard_normal((G * H, H), dtype=np.float32) * 0.05
dy = np.ones((1, 1, H), np.float32)
for i in range(250):  # as a training loop: a step's results live until the next one's
    if i == 50:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = fusedrnn.forward(cell, x, w_ih, w_hh)
    grads = fusedrnn.backward(out[3], dy)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults: getrusage")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="the sanitizer's allocator replaces the C heap this is about")
@pytest.mark.parametrize("cell,gates", [("rnn_tanh", 1), ("gru", 3)])
def test_training_steps_do_not_fault_in_their_gradients(cell, gates):
    """A NumPy training loop at T = 1, H = 256, each step's results alive until the
    next step's replace them: the weight gradients (256 and 768 KiB) come from the
    kept blocks, not from fresh pages at every step. With results from
    malloc up to 1 MiB, glibc mapped (or trimmed and regrew) them at every step: 48 and
    176 page faults per step, and a backward 5-6x slower than the math. In a fresh
    process: torch (imported by other tests) changes how the C heap behaves."""
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, cell, str(gates)],
                         capture_output=True, text=True, timeout=120, check=True)
    per_step = float(out.stdout.strip())
    assert per_step < 4, per_step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults: getrusage")
def test_kept_blocks_serve_a_large_call_after_other_shapes():
    """The kept blocks (csrc/cpu/workspace.cpp) keep a large call's buffers while calls
    of other shapes come and go: an LSTM forward at B = 64, H = 512 then faults in none
    of its 50 MiB of gate pre-activations again. Dropping the largest block first, once
    the slots were full, threw that buffer away at every call: 12,800 page faults and
    about 10% more time per call after one training call at B = 32, H = 256."""
    import resource

    def faults(f):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def training(shape, seed):
        args, kw, dy, dh_n, dc_n = make_problem("lstm", *shape, np.float32,
                                                np.random.default_rng(seed))
        return lambda: fusedrnn.backward(fusedrnn.forward(*args, **kw)[3], dy, dh_n, dc_n)

    args, kw, *_ = make_problem("lstm", 100, 64, 512, 512, np.float32,
                                np.random.default_rng(13))
    big = lambda: fusedrnn.forward(*args, **kw, training=False)  # noqa: E731
    big()
    training((100, 64, 512, 512), 14)()
    big()
    training((100, 32, 256, 256), 15)()
    big()
    got = [faults(big) for _ in range(2)]
    assert max(got) < 1000, got  # the gate buffer alone is 12,800 pages

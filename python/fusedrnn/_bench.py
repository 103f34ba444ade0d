"""``python -m fusedrnn bench``: time fusedrnn against its NumPy reference and torch.nn.

Shape legend (shared/DESIGN.md section 2): T steps, B batch, I input size,
H hidden size, G gates (rnn 1, gru 3, lstm 4).

A *case* is one (cell, T, B, I, H, pass); every case is run by each selected
*provider*:

- ``fusedrnn``:  the compiled backend (``fusedrnn.forward`` / ``backward``);
- ``reference``: the NumPy oracle (``fusedrnn.reference``), slow, so only on
  shapes with T*B*H <= ``--ref-limit``;
- ``torch``:     ``torch.nn.RNN`` (tanh/relu), ``LSTM`` or ``GRU`` on the CPU,
  only when torch imports (it is imported here, at run time, never by
  ``import fusedrnn``);
- ``fusedrnn.torch``: the PyTorch drop-in modules on the same problem;
- ``fusedrnn.ckpt``: fusedrnn with the memory-saving cache
  (``forward(..., checkpoint=True)``: states every ceil(sqrt(T)) steps, backward
  recomputes the rest); forward+backward only.

Memory: for fusedrnn and fusedrnn.ckpt in forward+backward, one extra untimed
run reports the training cache (``cache.nbytes``) and the peak of fusedrnn's
working memory over forward and backward (cache included; outputs and
gradients, which are NumPy arrays, excluded), in MiB.

Passes: ``forward`` is inference (``training=False``; ``torch.no_grad()``).
``forward+backward`` is one training step of the layer: forward keeping what
backward needs, then the gradients of ``sum(y * dy)`` with respect to x and all
four weight/bias arrays (torch: ``torch.autograd.grad(y, [x, *params], dy)``,
which is that gradient without materialising the product).

Method (DESIGN.md section 7), so that ratios are trustworthy on a noisy machine:
all contenders run in this one process with the same thread count; per case
each provider runs once (its outputs are checked against fusedrnn's), once more
to size a *sample* (enough back-to-back calls to last ``--min-sample-ms``),
then ``--repeats`` rounds take one sample of each provider in a shuffled order,
so a noisy second hits everyone alike; the reported time per call is the median
sample.
GFLOP/s count 2*T*B*(I+H)*G*H FLOPs per forward (3x that per
forward+backward); with ``--lengths`` T*B becomes sum(lengths), the useful work.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fusedrnn
from . import _cli, reference

__all__ = ["add_arguments", "run", "FULL_SHAPES", "QUICK_SHAPES", "CSV_COLUMNS"]

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
PASSES = (FORWARD, FORWARD_BACKWARD)
#: --lengths: fusedrnn on the same problem at full length, for the ratio of the two
FULL = "fusedrnn.full"
#: ``fusedrnn.torch``: the PyTorch drop-in modules (fusedrnn/torch.py) on the same problem
PROVIDERS = ("fusedrnn", "reference", "torch", "fusedrnn.torch", "fusedrnn.ckpt")
DEFAULT_CELLS = ("lstm", "gru", "rnn_tanh")

#: default grid, (T, B, H) with I = H; the first is the cost of a call that does
#: almost nothing (the per-call overhead)
FULL_SHAPES = ((1, 1, 16), (100, 1, 256), (100, 8, 256), (100, 32, 256), (100, 64, 512),
               (50, 128, 1024))
#: ``--quick``: small enough for a smoke test of the whole tool in seconds
QUICK_SHAPES = ((20, 1, 64), (20, 1, 128), (20, 8, 64), (20, 8, 128))

#: the reference runs only where T*B*H is at most this (``--ref-limit``)
DEFAULT_REF_LIMIT = 1 << 20

#: fusedrnn cell -> torch.nn constructor name and keyword arguments
TORCH_CELLS = {
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
}  # rnn_sigmoid has no torch.nn equivalent

#: agreement with fusedrnn, relative to the result's scale (DESIGN.md section 7)
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}

CSV_COLUMNS = ("cell", "T", "B", "I", "H", "pass", "provider", "dtype", "threads", "lengths",
               "ms", "ms_min", "ms_max", "calls_per_sample", "repeats", "gflops",
               "speedup_vs_torch", "speedup_vs_reference", "max_rel_err", "check", "cache_mib",
               "peak_mib", "floor_ms")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to an (empty) argument parser."""
    p.add_argument("--quick", action="store_true",
                   help="small grid (T=20, B in {1,8}, H in {64,128}) with shorter samples: a "
                        "smoke test of a few seconds")
    p.add_argument("--cells", type=_csv_list(fusedrnn.CELLS), default=",".join(DEFAULT_CELLS),
                   help="comma-separated cells (default: %(default)s; also rnn_relu, "
                        "rnn_sigmoid)")
    p.add_argument("--shapes", nargs="+", metavar="T,B,H[,I]",
                   help="shapes to run, separated by spaces or ';' (I defaults to H); "
                        "overrides the default and --quick grids")
    p.add_argument("--passes", type=_csv_list(PASSES), default=",".join(PASSES),
                   help="comma-separated passes (default: %(default)s)")
    p.add_argument("--providers", type=_csv_list(PROVIDERS), default=",".join(PROVIDERS),
                   help="comma-separated providers (default: %(default)s; torch is "
                        "skipped when it does not import)")
    p.add_argument("--repeats", type=_positive_int,
                   help="timed samples per provider and case; the median is reported "
                        "(default 5, --quick 3)")
    p.add_argument("--min-sample-ms", type=float,
                   help="calls are repeated back to back until one sample lasts at least "
                        "this long (default 50, --quick 20)")
    p.add_argument("--threads", type=_positive_int,
                   help="threads for every contender (default: fusedrnn.get_num_threads())")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="element type (default: %(default)s)")
    p.add_argument("--lengths", action="store_true",
                   help="variable-length rows: lengths uniform in [T/4, T] (torch via "
                        "pack_padded_sequence(enforce_sorted=False)); fusedrnn also runs "
                        "each shape at full length (provider fusedrnn.full, interleaved) "
                        "for the ratio of the two")
    p.add_argument("--ref-limit", type=int, default=DEFAULT_REF_LIMIT, metavar="N",
                   help="run the reference only where T*B*H <= N; 0 = always "
                        "(default: %(default)s)")
    p.add_argument("--csv", default=os.path.join("bench", "out", "bench.csv"), metavar="PATH",
                   help="where to write the CSV (default: %(default)s; '' = none)")
    p.add_argument("--plot", metavar="PATH",
                   help="also write a PNG bar chart of the speedups (needs matplotlib)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when any result disagrees with fusedrnn's")
    p.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    p.add_argument("--model", action="store_true",
                   help="time the layer inside a model, Embedding -> layer -> Linear, with "
                        "torch.nn's layer and with fusedrnn.torch's (needs torch; see "
                        "fusedrnn/_bench_model.py); default shapes T,B,H 1,1,256 100,8,256 "
                        "100,32,256")
    p.add_argument("--jax", action="store_true",
                   help="time fusedrnn.jax against a jax.lax.scan layer and fusedrnn itself "
                        "(needs jax; see fusedrnn/_bench_jax.py); default shapes T,B,H "
                        "100,1,256 100,8,256 100,32,256 100,64,512")


def _csv_list(allowed):
    allowed = tuple(allowed)

    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(items))  # drop duplicates, keep order

    return parse


_positive_int = _cli.positive_int


def parse_shapes(items: Sequence[str]) -> List[Tuple[int, int, int, int]]:
    """'T,B,H' or 'T,B,H,I' items (each may hold several, ';'-separated) -> [(T, B, I, H)]."""
    shapes = []
    for item in items:
        for part in item.split(";"):
            part = part.strip()
            if not part:
                continue
            try:
                nums = [int(v) for v in part.replace("x", ",").split(",")]
            except ValueError:
                nums = []
            if len(nums) not in (3, 4) or min(nums) < 1:
                raise ValueError(f"--shapes: expected T,B,H or T,B,H,I with positive "
                                 f"integers, got {part!r}")
            T, B, H = nums[:3]
            I = nums[3] if len(nums) == 4 else H
            shapes.append((T, B, I, H))
    if not shapes:
        raise ValueError("--shapes: no shape given")
    return shapes


# --------------------------------------------------------------------------
# Problems and providers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    pass_: str

    @property
    def G(self) -> int:
        return fusedrnn.CELLS[self.cell]


@dataclass
class Problem:
    """The arrays of one (cell, shape), shared by all providers and passes."""
    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [G*H, I]
    w_hh: np.ndarray  # [G*H, H]
    b_ih: np.ndarray  # [G*H]
    b_hh: np.ndarray  # [G*H]
    dy: np.ndarray  # [T, B, H], gradient of the loss w.r.t. y
    lengths: Optional[np.ndarray]  # [B] int64 in [T/4, T], or None

    @property
    def steps(self) -> int:
        """(t, b) steps that do work: sum(lengths), or T*B."""
        T, B = self.x.shape[:2]
        return int(self.lengths.sum()) if self.lengths is not None else T * B


def make_problem(cell, T, B, I, H, dtype, use_lengths, seed) -> Problem:
    """Random inputs at torch.nn's initial scale (weights uniform in +-1/sqrt(H))."""
    rng = np.random.default_rng([seed, T, B, I, H, fusedrnn.CELLS[cell]])
    GH = fusedrnn.CELLS[cell] * H
    k = 1.0 / math.sqrt(H)

    def u(shape, scale):
        return rng.uniform(-scale, scale, size=shape).astype(dtype)

    lengths = None
    if use_lengths:
        lengths = rng.integers(max(1, -(-T // 4)), T + 1, size=B).astype(np.int64)
    return Problem(x=u((T, B, I), 1.0), w_ih=u((GH, I), k), w_hh=u((GH, H), k),
                   b_ih=u(GH, k), b_hh=u(GH, k), dy=u((T, B, H), 1.0), lengths=lengths)


def flops(case: Case, prob: Problem) -> float:
    """2*steps*(I+H)*G*H for forward, 3x that for forward+backward."""
    f = 2.0 * prob.steps * (case.I + case.H) * case.G * case.H
    return 3.0 * f if case.pass_ == FORWARD_BACKWARD else f


#: a bound provider: ``call()`` does one timed call and returns its raw result;
#: ``outputs(result)`` turns that into named NumPy arrays for the correctness check
Bound = Tuple[Callable[[], object], Callable[[object], Dict[str, np.ndarray]]]


def bind_numpy_api(api, case: Case, prob: Problem, checkpoint=False) -> Bound:
    """fusedrnn or fusedrnn.reference: both share the forward/backward API."""
    args = (case.cell, prob.x, prob.w_ih, prob.w_hh, prob.b_ih, prob.b_hh)
    if case.pass_ == FORWARD:
        def call():
            return api.forward(*args, lengths=prob.lengths, training=False)

        def outputs(r):
            y, h_n, c_n, _ = r
            return _named(y=y, h_n=h_n, c_n=c_n)
    else:
        def call():
            y, h_n, c_n, cache = api.forward(*args, lengths=prob.lengths, training=True,
                                             checkpoint=checkpoint)
            return y, h_n, c_n, api.backward(cache, prob.dy)

        def outputs(r):
            y, h_n, c_n, g = r
            return _named(y=y, h_n=h_n, c_n=c_n, dx=g["x"], dw_ih=g["w_ih"],
                          dw_hh=g["w_hh"], db_ih=g["b_ih"], db_hh=g["b_hh"])
    return call, outputs


def bind_torch(torch, case: Case, prob: Problem, modules=None) -> Bound:
    """torch.nn.RNN/LSTM/GRU with fusedrnn's weights (same layout and gate order).

    ``modules``: where the RNN/LSTM/GRU classes come from, torch.nn by default;
    ``fusedrnn.torch`` times the drop-in modules exactly as a torch user runs them.
    """
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    kind, kwargs = TORCH_CELLS[case.cell]
    tdtype = torch.float64 if prob.x.dtype == np.float64 else torch.float32
    module = getattr(modules or torch.nn, kind)(case.I, case.H, dtype=tdtype, **kwargs)
    params = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    with torch.no_grad():
        for p, a in zip(params, (prob.w_ih, prob.w_hh, prob.b_ih, prob.b_hh)):
            p.copy_(torch.from_numpy(a))
    lengths = None if prob.lengths is None else torch.from_numpy(prob.lengths)
    T = case.T

    def run(x):
        if lengths is None:
            y, state = module(x)
        else:  # what a torch user does with padded batches; part of the timed call
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            y, state = module(packed)
            y, _ = pad_packed_sequence(y, total_length=T)
        h_n, c_n = state if case.cell == "lstm" else (state, None)
        return y, h_n[0], (None if c_n is None else c_n[0])

    if case.pass_ == FORWARD:
        x = torch.from_numpy(prob.x)

        def call():
            with torch.no_grad():
                return run(x)

        def outputs(r):
            return _named(y=r[0], h_n=r[1], c_n=r[2])
    else:
        x = torch.from_numpy(prob.x).requires_grad_(True)
        dy = torch.from_numpy(prob.dy)
        inputs = [x] + params

        def call():
            y, h_n, c_n = run(x)
            # the gradient of sum(y * dy), without building the product
            return y, h_n, c_n, torch.autograd.grad(y, inputs, grad_outputs=dy)

        def outputs(r):
            y, h_n, c_n, (dx, dw_ih, dw_hh, db_ih, db_hh) = r
            return _named(y=y, h_n=h_n, c_n=c_n, dx=dx, dw_ih=dw_ih, dw_hh=dw_hh,
                          db_ih=db_ih, db_hh=db_hh)
    return call, outputs


def measure_memory(case: Case, prob: Problem, checkpoint) -> Tuple[float, float]:
    """(cache MiB, peak MiB) of one fusedrnn forward+backward: the training cache, and
    the most of fusedrnn's working memory alive at once (cache included)."""
    core = fusedrnn._core
    gc.collect()
    base = core.workspace_in_use_bytes()
    core.workspace_reset_peak()
    y, h_n, c_n, cache = fusedrnn.forward(case.cell, prob.x, prob.w_ih, prob.w_hh, prob.b_ih,
                                          prob.b_hh, lengths=prob.lengths, checkpoint=checkpoint)
    nbytes = cache.nbytes
    fusedrnn.backward(cache, prob.dy)
    peak = core.workspace_peak_bytes() - base
    del cache
    return nbytes / 2**20, peak / 2**20


def _named(**arrays) -> Dict[str, np.ndarray]:
    """Drop Nones; torch tensors -> NumPy."""
    out = {}
    for k, v in arrays.items():
        if v is None:
            continue
        if hasattr(v, "detach"):
            v = v.detach().numpy()
        out[k] = np.asarray(v)
    return out


def rel_err(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Tuple[float, str]:
    """Worst max|a - b| / max|b| over the arrays both have, and which array it was."""
    worst, where = 0.0, ""
    for k in a.keys() & b.keys():
        x = a[k].astype(np.float64)
        y = b[k].astype(np.float64)
        if x.shape != y.shape:
            return math.inf, f"{k} shape {x.shape} vs {y.shape}"
        if y.size == 0:
            continue
        diff = float(np.max(np.abs(x - y)))
        scale = float(np.max(np.abs(y)))
        e = 0.0 if diff == 0 else (diff / scale if scale > 0 else math.inf)
        if not e <= worst:  # also catches NaN
            worst, where = (math.inf if math.isnan(e) else e), k
    return worst, where


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def _time_sample(call, n: int) -> float:
    """Seconds per call over n back-to-back calls."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t0) / n
    finally:
        if gc_was_enabled:
            gc.enable()


# OpenBLAS's worker threads keep spinning for about 0.1 s after each
# multithreaded call (its THREAD_TIMEOUT, 2^28 cycles) before they sleep. NumPy's
# BLAS (the reference's matmuls) thus holds one of the cores for that long, and
# whatever runs next gets the machine half-empty: on the 2-core development
# machine a 2-thread LSTM forward right after a NumPy matmul ran 1.4-5x slower
# (fusedrnn and torch alike). So the reference is timed after the other
# providers' rounds, and after the check (which runs it) the first provider
# runs untimed for NUMPY_BLAS_SETTLE_S. (Waiting idle instead would let the
# idle CPUs of a virtual machine halt, and the next wake-up can then stack two
# threads on one CPU: see csrc/cpu/pool.h.)
NUMPY_BLAS_SETTLE_S = 0.25
# Any provider leaves a shorter wake: right after torch.nn's sample the next
# provider's first call or two took up to 7x their usual time, for about 5-10 ms
# (fusedrnn and fusedrnn.torch alike). So every sample of a provider whose call
# takes under WARMUP_BELOW_S is preceded by SAMPLE_WARMUP_S of its own calls (at
# least one), untimed; longer calls amortise the wake within the sample. And the
# order of the providers is shuffled every round, so that no provider always
# follows the same one.
SAMPLE_WARMUP_S = 0.02
WARMUP_BELOW_S = 0.1


def _run_for(call: Callable[[], object], seconds: float) -> None:
    """Calls call() back to back for at least ``seconds`` (at least once), untimed."""
    t0 = time.perf_counter()
    call()
    while time.perf_counter() - t0 < seconds:
        call()


def time_interleaved(calls: Dict[str, Callable[[], object]], repeats: int,
                     min_sample_s: float,
                     numpy_blas: Sequence[str] = ()) -> Dict[str, Tuple[List[float], int]]:
    """Per provider: (seconds per call of each sample, calls per sample).

    Each provider has already run once (the check). One more call sizes its sample;
    then each round takes one sample of every provider, in a random order (fixed seed).
    The providers named in ``numpy_blas`` (NumPy's BLAS: the reference) are kept out
    of the rounds, whose samples their spinning threads would slow, and timed after
    them, sample after sample; the first call after the check (which ran them) is
    preceded by NUMPY_BLAS_SETTLE_S of untimed calls. Before every other sample a
    provider whose calls take under WARMUP_BELOW_S runs untimed for SAMPLE_WARMUP_S.
    """
    names = list(calls)
    blas = [n for n in names if n in set(numpy_blas)]
    peers = [n for n in names if n not in blas]
    settle = bool(blas)
    per_call: Dict[str, float] = {}
    per_sample: Dict[str, int] = {}
    samples: Dict[str, List[float]] = {name: [] for name in names}

    def sample(name: str, n: int) -> float:
        nonlocal settle
        if settle:
            _run_for(calls[name], NUMPY_BLAS_SETTLE_S)
            settle = False
        elif per_call.get(name, math.inf) < WARMUP_BELOW_S:
            _run_for(calls[name], SAMPLE_WARMUP_S)
        return _time_sample(calls[name], n)

    def size(group: Sequence[str]) -> None:
        for name in group:
            per_call[name] = t = sample(name, 1)
            per_sample[name] = max(1, min(10000, math.ceil(min_sample_s / max(t, 1e-9))))

    size(peers)
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(peers, len(peers)):
            samples[name].append(sample(name, per_sample[name]))
    size(blas)
    for name in blas:
        for _ in range(repeats):
            samples[name].append(sample(name, per_sample[name]))
    return {name: (samples[name], per_sample[name]) for name in names}


class Ceilings:
    """This machine's limits on the benchmark's thread count, from fusedrnn's probes:
    the float32 multiply-add peak of the kernels' instruction set (12 register
    accumulators per thread), and the rate at which the threads read a weight of a
    given size over and over (one multiply-add per value, no synchronisation).

    ``floor_ms`` bounds a case's time from below for any implementation that does the
    counted FLOPs and reads W_hh from memory once per step in the case's dtype (a step
    needs all of W_hh and the state the step before made): the larger of the FLOPs at
    the peak and the steps' W_hh reads (twice with backward, whose transposed product
    reads it again) at the read rate. The cell's pointwise math, other memory traffic
    and synchronisation are not counted, so no implementation reaches it; torch's
    time over it is the most any implementation could show against torch in the
    same run.

    Both probes keep the best of their samples. They run before anything else
    (``nbytes``: the W_hh sizes the run will need), while no other library's threads
    are about, and again after the grid (``remeasure``), keeping the better value: an
    underestimated limit would make the floor too high.
    """

    def __init__(self, threads: int, nbytes: Sequence[int] = ()):
        self.threads = threads
        self.peak_gflops = fusedrnn._core.probe_fma_gflops(threads)
        self._read: Dict[int, float] = {}
        for n in sorted(set(nbytes)):
            self.read_gbps(n)

    def read_gbps(self, nbytes: int) -> float:
        if nbytes not in self._read:
            self._read[nbytes] = fusedrnn._core.probe_stream_gbps(nbytes, self.threads)
        return self._read[nbytes]

    def remeasure(self) -> None:
        """Probe again; keep the better value of each limit."""
        self.peak_gflops = max(self.peak_gflops,
                               fusedrnn._core.probe_fma_gflops(self.threads))
        for n in self._read:
            self._read[n] = max(self._read[n],
                                fusedrnn._core.probe_stream_gbps(n, self.threads))

    @staticmethod
    def work(case: Case, prob: Problem) -> Tuple[float, int, int, int]:
        """What bounds a case: (FLOPs, itemsize, W_hh bytes, W_hh reads)."""
        itemsize = prob.w_hh.itemsize
        steps = int(prob.lengths.max()) if prob.lengths is not None else case.T
        reads = 2 if case.pass_ == FORWARD_BACKWARD else 1
        return flops(case, prob), itemsize, case.G * case.H * case.H * itemsize, reads * steps

    def floor_ms(self, work: Tuple[float, int, int, int]) -> float:
        """The floor of a case's ``work`` at the limits measured so far."""
        n_flops, itemsize, nbytes, reads = work
        compute_s = n_flops / (self.peak_gflops * 4.0 / itemsize * 1e9)
        read_s = reads * nbytes / (self.read_gbps(nbytes) * 1e9)
        return 1e3 * max(compute_s, read_s)


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """NumPy float32 n x n x n matmul rate (NumPy's own BLAS and thread count)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)  # warm-up
    t = statistics.median(_time_sample(lambda: np.matmul(a, b, out=out), 1)
                          for _ in range(repeats))
    return 2.0 * n ** 3 / t / 1e9


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older NumPy: purely informational
        return "unknown"


def import_torch():
    """torch, or None when it does not import."""
    try:
        import torch  # noqa: PLC0415 - only the benchmark may import torch
    except ImportError:
        return None
    return torch


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

@dataclass
class Row:
    case: Case
    provider: str
    dtype: str
    threads: int
    lengths: bool
    repeats: int
    ms: float = math.nan
    ms_min: float = math.nan
    ms_max: float = math.nan
    calls_per_sample: int = 0
    gflops: float = math.nan
    speedup_vs_torch: float = math.nan
    speedup_vs_reference: float = math.nan
    max_rel_err: float = math.nan
    check: str = "-"  # "ok", "MISMATCH(<array>)", "error: ...", or "-" (nothing to compare)
    cache_mib: float = math.nan  # fusedrnn providers, forward+backward: cache.nbytes
    peak_mib: float = math.nan  # and the peak of working memory
    floor_ms: float = math.nan  # the case's lower bound on time (Ceilings.floor_ms)
    floor_work: Tuple[float, int, int, int] = (0.0, 4, 0, 0)  # Ceilings.work of the case

    def csv_record(self) -> Dict[str, object]:
        c = self.case
        return {"cell": c.cell, "T": c.T, "B": c.B, "I": c.I, "H": c.H, "pass": c.pass_,
                "provider": self.provider, "dtype": self.dtype, "threads": self.threads,
                "lengths": int(self.lengths), "ms": _g(self.ms), "ms_min": _g(self.ms_min),
                "ms_max": _g(self.ms_max), "calls_per_sample": self.calls_per_sample,
                "repeats": self.repeats, "gflops": _g(self.gflops),
                "speedup_vs_torch": _g(self.speedup_vs_torch),
                "speedup_vs_reference": _g(self.speedup_vs_reference),
                "max_rel_err": _g(self.max_rel_err), "check": self.check,
                "cache_mib": _g(self.cache_mib), "peak_mib": _g(self.peak_mib),
                "floor_ms": _g(self.floor_ms)}


def _g(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


#: the human table: (title, width, cell formatter)
_TABLE = (
    ("cell", 11, lambda r: r.case.cell),
    ("T", 4, lambda r: str(r.case.T)),
    ("B", 4, lambda r: str(r.case.B)),
    ("I", 5, lambda r: str(r.case.I)),
    ("H", 5, lambda r: str(r.case.H)),
    ("pass", 16, lambda r: r.case.pass_),
    ("provider", 14, lambda r: r.provider),
    ("ms", 9, lambda r: _fmt_ms(r.ms)),
    ("spread", 6, lambda r: _fmt_spread(r)),
    ("GFLOP/s", 7, lambda r: "-" if math.isnan(r.gflops) else f"{r.gflops:.1f}"),
    ("speedup vs torch", 16, lambda r: _fmt_ratio(r.speedup_vs_torch)),
    ("vs ref", 7, lambda r: _fmt_ratio(r.speedup_vs_reference)),
    ("MiB cache/peak", 14, lambda r: _fmt_mib(r)),
    ("check", 0, lambda r: _fmt_check(r)),
)
_NUMERIC = {"T", "B", "I", "H", "ms", "spread", "GFLOP/s", "speedup vs torch", "vs ref",
            "MiB cache/peak"}


def _fmt_ms(ms: float) -> str:
    if math.isnan(ms):
        return "-"
    if ms < 0.1:  # tiny calls: keep three significant digits (microseconds)
        return f"{ms:.3g}"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _fmt_spread(r: Row) -> str:
    """(slowest - fastest sample) / median: how much noise the median had to see through."""
    if math.isnan(r.ms) or r.repeats < 2:
        return "-"
    return f"{100 * (r.ms_max - r.ms_min) / r.ms:.0f}%"


def _fmt_mib(r: Row) -> str:
    if math.isnan(r.cache_mib):
        return "-"
    return f"{r.cache_mib:.3g}/{r.peak_mib:.3g}"


def _fmt_ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def _fmt_check(r: Row) -> str:
    if r.check in ("ok",) or r.check.startswith("MISMATCH"):
        return f"{r.check} {r.max_rel_err:.1e}"
    return r.check


def _line(values: Sequence[str], table=None, numeric=None) -> str:
    parts = []
    for (title, width, _), v in zip(table or _TABLE, values):
        parts.append(v.rjust(width) if title in (numeric or _NUMERIC) else v.ljust(width))
    return "  ".join(parts).rstrip()


def table_header(table=None, numeric=None) -> str:
    """The table's title line and rule (table: (title, width, format) columns;
    numeric: the titles right-aligned; default: this module's table)."""
    head = _line([t for t, _, _ in table or _TABLE], table, numeric)
    return head + "\n" + "-" * len(head)


def table_row(r, table=None, numeric=None) -> str:
    return _line([fmt(r) for _, _, fmt in table or _TABLE], table, numeric)


class DictRow(dict):
    """One provider's result for one case of the --model and --jax modes, keyed by column
    title (for write_csv)."""

    def csv_record(self) -> Dict[str, object]:
        return {c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in self.items()}


def peer_table(columns: Sequence[str], widths: Sequence[int]):
    """(table, numeric) for table_header / table_row of DictRows whose columns are cell,
    T, B, H, pass, provider, ms, spread, a speedup and check, in that order."""
    table = tuple(zip(columns, widths, (
        *(lambda r, c=c: str(r[c]) for c in columns[:6]),
        lambda r: _fmt_ms(r["ms"]),
        lambda r: f"{r['spread']:.0f}%",
        lambda r, c=columns[8]: f"{r[c]:.2f}x",
        lambda r: r["check"])))
    return table, set(columns[6:])


def peer_shapes(args: argparse.Namespace, default) -> Optional[List[Tuple[int, int, int]]]:
    """The (T, B, H) cases of the --model and --jax modes: --shapes (I = H there), else
    ``default``; None, after printing the error, when --shapes does not parse."""
    if not args.shapes:
        return list(default)
    try:
        return [(T, B, H) for T, B, H, _ in parse_shapes(args.shapes)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_peer_grid(out, cells, shapes, passes, run_case, table, numeric
                  ) -> Tuple[List[DictRow], bool]:
    """The --model and --jax modes' loop: run_case(cell, T, B, H, pass) -> (rows, ok) for
    every case, each row printed as it comes; returns (all rows, whether a case failed)."""
    print(table_header(table, numeric), file=out, flush=True)
    rows: List[DictRow] = []
    failed = False
    for cell in cells:
        for T, B, H in shapes:
            for pass_ in passes:
                case_rows, ok = run_case(cell, T, B, H, pass_)
                failed |= not ok
                for r in case_rows:
                    print(table_row(r, table, numeric), file=out, flush=True)
                rows += case_rows
    return rows, failed


def peer_rows(timed: Dict[str, Tuple[List[float], int]], case: Dict[str, object], check: str,
              peer: str, speedup_column: str) -> List[DictRow]:
    """DictRows of one case from time_interleaved's samples: median ms, spread (as the
    layer table's) and the speedup over ``peer``, in the order of ``timed``."""
    ms = {n: 1e3 * statistics.median(s) for n, (s, _) in timed.items()}
    rows = []
    for name, (samples, _) in timed.items():
        spread = (max(samples) - min(samples)) / statistics.median(samples)
        rows.append(DictRow(case, provider=name, ms=ms[name], spread=100.0 * spread,
                            check=check, **{speedup_column: ms[peer] / ms[name]}))
    return rows


def write_csv(path: str, rows: Sequence, columns=None) -> None:
    """rows (objects with csv_record()) as CSV with the given columns."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r.csv_record())


def write_plot(path: str, rows: Sequence[Row], out=sys.stdout) -> None:
    """Bar chart: fusedrnn's speedup vs torch (else vs reference), one panel per pass."""
    try:
        import matplotlib  # noqa: PLC0415 - optional
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"note: matplotlib is not installed; no plot written to {path}", file=out)
        return
    ours = [r for r in rows if r.provider == "fusedrnn"]
    peer, attr = "torch", "speedup_vs_torch"
    if all(math.isnan(r.speedup_vs_torch) for r in ours):
        peer, attr = "reference", "speedup_vs_reference"
    ours = [r for r in ours if not math.isnan(getattr(r, attr))]
    if not ours:
        print(f"note: no speedups to plot (no torch or reference rows); {path} not written",
              file=out)
        return
    passes = [p for p in PASSES if any(r.case.pass_ == p for r in ours)]
    fig, axes = plt.subplots(len(passes), 1, squeeze=False,
                             figsize=(max(6.0, 0.45 * len(ours) / len(passes) + 2), 3.6 * len(passes)))
    for ax, p in zip(axes[:, 0], passes):
        sel = [r for r in ours if r.case.pass_ == p]
        labels = [f"{r.case.cell}\n{r.case.T}x{r.case.B}x{r.case.H}" for r in sel]
        vals = [getattr(r, attr) for r in sel]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
        bars = ax.bar(range(len(sel)), vals, color=colors)
        ax.bar_label(bars, labels=[f"{v:.2g}" for v in vals], fontsize=7)
        ax.set_yscale("log")  # ratios: 2x faster and 2x slower look alike
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.set_ylabel(f"speedup vs {peer}")
        ax.set_title(f"fusedrnn {p} (T x B x H), {sel[0].dtype}, {sel[0].threads} threads")
    fig.tight_layout()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}", file=out)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def sampling(args: argparse.Namespace) -> Tuple[int, float]:
    """(samples per provider, seconds a sample lasts at least) from --repeats,
    --min-sample-ms and --quick."""
    repeats = args.repeats or (3 if args.quick else 5)
    min_sample_ms = args.min_sample_ms if args.min_sample_ms is not None else (
        20.0 if args.quick else 50.0)
    return repeats, min_sample_ms / 1000.0


def run(args: argparse.Namespace, out=None) -> int:
    """Run the benchmark described by parsed ``bench`` arguments; returns the exit status."""
    out = out or sys.stdout
    if getattr(args, "model", False) and getattr(args, "jax", False):
        print("error: --model and --jax are separate benchmarks; pass one", file=sys.stderr)
        return 2
    if getattr(args, "model", False):
        from . import _bench_model  # noqa: PLC0415

        return _bench_model.run(args, out)
    if getattr(args, "jax", False):
        from . import _bench_jax  # noqa: PLC0415

        return _bench_jax.run(args, out)
    try:
        shapes = (parse_shapes(args.shapes) if args.shapes
                  else [(T, B, H, H) for T, B, H in (QUICK_SHAPES if args.quick else FULL_SHAPES)])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    repeats, min_sample_s = sampling(args)
    dtype = np.dtype(args.dtype)
    tol = TOLERANCE[args.dtype]
    providers = list(args.providers)

    torch, torch_info = None, "not requested"
    if "torch" in providers or "fusedrnn.torch" in providers:
        torch = import_torch()
        if torch is None:
            providers = [n for n in providers if n not in ("torch", "fusedrnn.torch")]
            torch_info = "does not import; the torch providers are skipped"
        else:
            torch_info = torch.__version__
            if getattr(torch.backends, "mkldnn", None) and torch.backends.mkldnn.is_available():
                torch_info += " (oneDNN available)"

    old_threads = fusedrnn.get_num_threads()
    threads = args.threads or old_threads
    old_torch_threads = torch.get_num_threads() if torch is not None else None
    fusedrnn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        ceilings = Ceilings(threads, [fusedrnn.CELLS[c] * H * H * dtype.itemsize
                                      for c in args.cells for _, _, _, H in shapes])
        _print_header(out, threads, torch_info, args, repeats, min_sample_s, ceilings)
        rows = _run_grid(args.cells, shapes, args.passes, providers, dtype, tol, repeats,
                         min_sample_s, threads, args, torch, out, ceilings)
        ceilings.remeasure()
        for r in rows:
            r.floor_ms = ceilings.floor_ms(r.floor_work)
    finally:
        fusedrnn.set_num_threads(old_threads)
        if torch is not None:
            torch.set_num_threads(old_torch_threads)

    _print_summary(out, rows, providers)
    _print_lengths(out, rows)
    _print_ceilings(out, rows, ceilings)
    if args.csv:
        write_csv(args.csv, rows)
        print(f"CSV written to {args.csv}", file=out)
    if args.plot:
        write_plot(args.plot, rows, out)

    errors = [r for r in rows if r.check.startswith("error")]
    mismatches = [r for r in rows if r.check.startswith("MISMATCH")]
    if mismatches:
        print(f"WARNING: {len(mismatches)} row(s) marked MISMATCH: results differ from "
              f"fusedrnn's by more than {tol:.0e} relative to scale, so those times "
              f"compare different computations", file=sys.stderr)
    if errors:
        print(f"WARNING: {len(errors)} provider run(s) failed", file=sys.stderr)
    return 1 if errors or (mismatches and args.strict) else 0


def _print_header(out, threads, torch_info, args, repeats, min_sample_s, ceilings):
    """The machine and the method, above the table."""
    print(f"fusedrnn {fusedrnn.__version__} benchmark  "
          f"({time.strftime('%Y-%m-%d %H:%M:%S')}, Python {platform.python_version()})", file=out)
    print(f"CPU:      {cpu_model()} ({os.cpu_count()} logical CPUs)", file=out)
    print(f"threads:  {threads} (fusedrnn and torch; NumPy/reference use NumPy's BLAS "
          f"default)", file=out)
    print(f"BLAS:     fusedrnn: {fusedrnn._core.blas_config()}", file=out)
    print(f"          numpy {np.__version__}: {_numpy_blas()}", file=out)
    print(f"torch:    {torch_info}", file=out)
    print(f"sgemm:    numpy float32 1024^3 matmul {sgemm_gflops():.1f} GFLOP/s "
          f"(median of 5)", file=out)
    print(f"peak:     float32 multiply-add {ceilings.peak_gflops:.1f} GFLOP/s on {threads} "
          f"threads ({fusedrnn._core.isa()}; fusedrnn's probe, see 'ceilings' below)",
          file=out)
    mode = "lengths uniform in [T/4, T]" if args.lengths else "full length"
    print(f"setup:    {args.dtype}, {mode}, median of {repeats} interleaved samples of "
          f">= {min_sample_s * 1e3:g} ms; FLOPs 2*steps*(I+H)*G*H fwd, x3 fwd+bwd; "
          f"reference only where T*B*H <= {args.ref_limit or 'inf'}", file=out)
    print(file=out)
    print(table_header(), file=out, flush=True)


def _run_grid(cells, shapes, passes, providers, dtype, tol, repeats, min_sample_s, threads,
              args, torch, out, ceilings) -> List[Row]:
    rows: List[Row] = []
    notes_done = set()

    def note(msg):
        if msg not in notes_done:
            notes_done.add(msg)
            print(f"  note: {msg}", file=out)

    for cell in cells:
        for T, B, I, H in shapes:
            prob = make_problem(cell, T, B, I, H, dtype, args.lengths, args.seed)
            for pass_ in passes:
                case = Case(cell, T, B, I, H, pass_)
                active = []
                for name in providers:
                    if name == "reference" and args.ref_limit and T * B * H > args.ref_limit:
                        note(f"reference skipped where T*B*H > {args.ref_limit} (--ref-limit)")
                        continue
                    if name in ("torch", "fusedrnn.torch") and cell not in TORCH_CELLS:
                        note(f"torch has no {cell} cell; {name} skipped for it")
                        continue
                    if name == "fusedrnn.ckpt" and pass_ == FORWARD:
                        continue  # inference keeps no cache: the same call as fusedrnn
                    active.append(name)
                if args.lengths and "fusedrnn" in active:
                    active.append(FULL)  # the same call without lengths, for the ratio
                work = ceilings.work(case, prob)
                case_rows = _run_case(case, prob, active, dtype, tol, repeats, min_sample_s,
                                      threads, args.lengths, torch)
                for r in case_rows:
                    r.floor_work = work
                    print(table_row(r), file=out, flush=True)
                rows.extend(case_rows)
    return rows


def _run_case(case, prob, names, dtype, tol, repeats, min_sample_s, threads, lengths,
              torch) -> List[Row]:
    """Check, then time, one case for the given providers; one Row per provider."""
    rows = {n: Row(case, n, dtype.name, threads, lengths, repeats) for n in names}
    calls, outputs = {}, {}
    for n in names:
        try:
            if n == "torch":
                call, to_arrays = bind_torch(torch, case, prob)
            elif n == "fusedrnn.torch":
                from . import torch as fusedrnn_torch  # noqa: PLC0415 - imports torch

                call, to_arrays = bind_torch(torch, case, prob, fusedrnn_torch)
            elif n == FULL:  # other results (rows run to T): timed, not compared
                call, _ = bind_numpy_api(fusedrnn, case, replace(prob, lengths=None))
                call()
                calls[n] = call
                continue
            else:
                call, to_arrays = bind_numpy_api(reference if n == "reference" else fusedrnn,
                                                 case, prob, checkpoint=n == "fusedrnn.ckpt")
            outputs[n] = to_arrays(call())  # first call: the check, and a warm-up
            if n in ("fusedrnn", "fusedrnn.ckpt") and case.pass_ == FORWARD_BACKWARD:
                rows[n].cache_mib, rows[n].peak_mib = measure_memory(
                    case, prob, checkpoint=n == "fusedrnn.ckpt")
            calls[n] = call
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            rows[n].check = f"error: {type(e).__name__}: {e}".splitlines()[0][:120]

    # correctness: everyone against fusedrnn (or the first provider that ran)
    base = "fusedrnn" if "fusedrnn" in outputs else next(iter(outputs), None)
    worst = 0.0
    for n in outputs:
        if n == base:
            continue
        err, where = rel_err(outputs[n], outputs[base])
        rows[n].max_rel_err = err
        rows[n].check = "ok" if err <= tol else f"MISMATCH({where})"
        worst = max(worst, err)
    if base is not None and len(outputs) > 1:
        bad = [n for n in outputs if rows[n].check.startswith("MISMATCH")]
        rows[base].max_rel_err = worst
        rows[base].check = f"MISMATCH(vs {','.join(bad)})" if bad else "ok"
    del outputs

    for n, (samples, k) in time_interleaved(calls, repeats, min_sample_s,
                                            numpy_blas=("reference",)).items():
        r = rows[n]
        r.ms = 1e3 * statistics.median(samples)
        r.ms_min, r.ms_max = 1e3 * min(samples), 1e3 * max(samples)
        r.calls_per_sample = k
        work = flops(case, replace(prob, lengths=None) if n == FULL else prob)
        r.gflops = work / (r.ms * 1e-3) / 1e9
    for r in rows.values():
        if r.provider == FULL:  # not the same work as the others
            continue
        if "torch" in rows and not math.isnan(rows["torch"].ms):
            r.speedup_vs_torch = rows["torch"].ms / r.ms
        if "reference" in rows and not math.isnan(rows["reference"].ms):
            r.speedup_vs_reference = rows["reference"].ms / r.ms
    return list(rows.values())


def _by_case(rows: Sequence[Row]) -> Dict[Case, Dict[str, Row]]:
    """Rows grouped by case, then by provider."""
    by_case: Dict[Case, Dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.provider] = r
    return by_case


def _print_ceilings(out, rows: Sequence[Row], ceilings: Ceilings) -> None:
    """Per case timed by fusedrnn and torch: the floor (Ceilings.floor_ms), how close
    each came to it, and the most any implementation could be faster than torch."""
    lines = []
    for case, rs in _by_case(rows).items():
        f, t = rs.get("fusedrnn"), rs.get("torch")
        if f is None or t is None or math.isnan(f.ms) or math.isnan(t.ms):
            continue
        lines.append(_line([case.cell, str(case.T), str(case.B), str(case.I), str(case.H),
                            case.pass_, f"{f.floor_ms:.4g}", f"{100 * f.floor_ms / f.ms:.0f}%",
                            f"{100 * f.floor_ms / t.ms:.0f}%", f"{t.ms / f.floor_ms:.2f}x"],
                           _CEILING_TABLE, _CEILING_NUMERIC))
    if not lines:
        return
    print(file=out)
    print("ceilings: floor = max(FLOPs at the multiply-add peak, steps x W_hh bytes (x2 with "
          "backward) at the weight read rate); no implementation that reads W_hh in this "
          "dtype once per step gets below it. % of floor = floor / median time; "
          "max speedup = torch / floor.", file=out)
    print(f"peak {ceilings.peak_gflops:.1f} GFLOP/s (the better of the probes before and "
          f"after the grid); W_hh read rates: "
          + ", ".join(f"{n / 1024:g} KiB {g:.0f} GB/s" for n, g in sorted(ceilings._read.items())),
          file=out)
    print(table_header(_CEILING_TABLE, _CEILING_NUMERIC), file=out)
    for line in lines:
        print(line, file=out)


_CEILING_TABLE = tuple((title, width, None) for title, width in (
    ("cell", 8), ("T", 5), ("B", 5), ("I", 6), ("H", 6), ("pass", 16), ("floor ms", 9),
    ("fusedrnn % of floor", 19), ("torch % of floor", 16), ("max speedup vs torch", 20)))
_CEILING_NUMERIC = {t for t, _, _ in _CEILING_TABLE} - {"cell", "pass"}


def _print_lengths(out, rows: Sequence[Row]) -> None:
    """--lengths: fusedrnn's time with lengths over its time at full length (FULL), both
    timed interleaved in this run, next to the share of the work the lengths leave."""
    lines = []
    for case, rs in _by_case(rows).items():
        f, full = rs.get("fusedrnn"), rs.get(FULL)
        if f is None or full is None or math.isnan(f.ms) or math.isnan(full.ms):
            continue
        work = (f.gflops * f.ms) / (full.gflops * full.ms)  # sum(lengths) / (T*B)
        lines.append(f"  {case.cell:<9} T={case.T:<4} B={case.B:<4} H={case.H:<5} "
                     f"{case.pass_:<16} {f.ms / full.ms:.2f}x  (work {work:.2f}x)")
    if lines:
        print(file=out)
        print("variable lengths: fusedrnn's median / its median on the same shape at full "
              "length (provider fusedrnn.full, interleaved in this run)", file=out)
        for line in lines:
            print(line, file=out)


def _print_summary(out, rows: Sequence[Row], providers: Sequence[str]) -> None:
    """Geometric-mean speedups of fusedrnn, per pass."""
    print(file=out)
    for peer, attr in (("torch", "speedup_vs_torch"), ("reference", "speedup_vs_reference")):
        if peer not in providers:
            continue
        parts = []
        for p in PASSES:
            vals = [getattr(r, attr) for r in rows
                    if r.provider == "fusedrnn" and r.case.pass_ == p
                    and not math.isnan(getattr(r, attr))]
            if vals:
                gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
                parts.append(f"{p} {gm:.2f}x over {len(vals)} cases")
        if parts:
            print(f"fusedrnn speedup vs {peer} (geometric mean): " + "; ".join(parts),
                  file=out)

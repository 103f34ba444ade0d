"""``python -m fusedrnn bench --device cuda``: fusedrnn's CUDA backend against torch.nn (cuDNN).

Shape legend (shared/DESIGN.md section 2): T steps, B batch, I input size,
H hidden size, G gates (rnn 1, gru 3, lstm 4).

A *case* is one (cell, T, B, I, H, dtype, pass); every case is run by each
selected *provider*, all on one GPU, on torch's current stream, with torch
CUDA tensors as inputs and outputs:

- ``fusedrnn``:            ``fusedrnn.forward``/``backward`` with the automatic
  choice of algorithm (the ``algo`` column says which one it picked);
- ``fusedrnn.standard``:   the standard algorithm (cuBLAS products per step and
  one fused pointwise kernel);
- ``fusedrnn.persistent``: the persistent kernel (W_hh on chip for all steps),
  only where it fits the device (a note says where it was skipped);
- ``fusedrnn.benchmark``:  benchmark mode (FUSEDRNN_CUDA_ALGO=benchmark): the
  first call times the standard algorithm and the persistent kernels in grid
  and in cluster mode, forward and backward apart, and keeps the fastest (the
  ``algo`` column says which: ``bench:<forward>/<backward>``, each standard,
  persistent or cluster);
- ``torch``:               ``torch.nn.RNN``/``LSTM``/``GRU`` on CUDA, i.e. cuDNN
  where cuDNN takes the dtype.

Passes: ``forward`` is inference (fusedrnn ``training=False``; torch in eval
mode under ``torch.no_grad()``). ``forward+backward`` is one training step of
the layer: forward keeping what backward needs, then the gradients of
``sum(y * dy)`` with respect to x and the four weight/bias arrays (torch:
``torch.autograd.grad(y, [x, *params], dy)``).

float32 is true float32 on both sides: the run sets
``torch.backends.cudnn.allow_tf32 = False`` and
``torch.backends.cuda.matmul.allow_tf32 = False`` (restored afterwards), and
fusedrnn's cuBLAS calls use CUBLAS_COMPUTE_32F in the default math mode (no
TF32). bfloat16/float16: arrays in that type, float32 arithmetic in fusedrnn.

Method (DESIGN.md section 7): per case each provider runs once (its outputs are
checked against torch's, else fusedrnn's), once more as a warm-up and to size
a *sample* (enough back-to-back calls to last ``--min-sample-ms``, default 5,
``--quick`` 2), then ``--repeats`` samples go round-robin over the providers,
each timed with CUDA events around the sample; the reported time per call is
the median sample. GFLOP/s count 2*T*B*(I+H)*G*H FLOPs per forward (3x that
per forward+backward). The CSV and the printed text go to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fusedrnn
from . import _bench

__all__ = ["add_arguments", "run", "PROVIDERS", "DEFAULT_PROVIDERS", "DTYPES", "FULL_SHAPES",
           "QUICK_SHAPES", "CSV_COLUMNS", "flops"]

FORWARD, FORWARD_BACKWARD, PASSES = _bench.FORWARD, _bench.FORWARD_BACKWARD, _bench.PASSES
PROVIDERS = ("fusedrnn", "fusedrnn.standard", "fusedrnn.persistent", "fusedrnn.benchmark",
             "fusedrnn.ckpt", "torch")
#: fusedrnn.ckpt (checkpoint=True, forward+backward only) on request
DEFAULT_PROVIDERS = ("fusedrnn", "fusedrnn.standard", "fusedrnn.persistent", "fusedrnn.benchmark",
                     "torch")
#: provider -> the ``algo`` argument of fusedrnn's device forward
ALGOS = {"fusedrnn": "auto", "fusedrnn.standard": "standard", "fusedrnn.persistent": "persistent",
         "fusedrnn.benchmark": "benchmark", "fusedrnn.ckpt": "auto"}
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPES = ("float32", "bfloat16")

#: default grid, (T, B, H) with I = H
FULL_SHAPES = tuple((100, B, H) for B in (1, 8, 64) for H in (256, 512, 1024))
#: ``--quick``: a handful of points
QUICK_SHAPES = ((100, 1, 256), (100, 64, 1024))

#: sanity check of every provider against torch (else fusedrnn), relative to the
#: result's scale. Looser than the tests' bounds (tests/test_cuda.py): two
#: different float32 (or bf16/fp16) computations over T = 100 steps, not one
#: against a float64 oracle. Wrong kernels miss these by orders of magnitude.
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}

CSV_COLUMNS = ("device", "cell", "T", "B", "I", "H", "pass", "dtype", "provider", "algo", "ms",
               "ms_min", "ms_max", "calls_per_sample", "repeats", "gflops", "speedup_vs_torch",
               "max_rel_err", "check")

#: options of the CPU benchmark that mean nothing here (a note says they were ignored)
_CPU_ONLY = (("threads", None), ("lengths", False), ("plot", None), ("dtype", "float32"),
             ("providers", list(_bench.PROVIDERS)), ("ref_limit", _bench.DEFAULT_REF_LIMIT))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--device`` and the GPU-only options to the ``bench`` parser.

    ``--cells``, ``--shapes``, ``--passes``, ``--quick``, ``--repeats``,
    ``--min-sample-ms``, ``--seed`` and ``--strict`` (the CPU benchmark's
    options) mean the same with ``--device cuda``.
    """
    g = p.add_argument_group(
        "GPU benchmark (--device cuda)",
        "fusedrnn's CUDA backend against torch.nn on CUDA (cuDNN): default grid T=100, "
        "B in {1,8,64}, H in {256,512,1024}, I=H, float32 and bfloat16")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): the CPU benchmark; cuda: the GPU benchmark")
    g.add_argument("--out", metavar="DIR", default=os.path.join("bench", "out"),
                   help="with --device cuda: folder for the CSV and the text output, "
                        "cuda-<gpu>.csv and cuda-<gpu>.txt (default: %(default)s)")
    g.add_argument("--cuda-dtypes", type=_bench._csv_list(DTYPES), default=",".join(DEFAULT_DTYPES),
                   help="comma-separated dtypes on the GPU (default: %(default)s; also float16)")
    g.add_argument("--cuda-providers", type=_bench._csv_list(PROVIDERS),
                   default=",".join(DEFAULT_PROVIDERS),
                   help="comma-separated GPU providers (default: %(default)s; also "
                        "fusedrnn.ckpt: checkpoint=True, forward+backward only)")


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
    dtype: str
    pass_: str

    @property
    def G(self) -> int:
        return fusedrnn.CELLS[self.cell]


def flops(case) -> float:
    """2*T*B*(I+H)*G*H for forward, 3x that for forward+backward."""
    f = 2.0 * case.T * case.B * (case.I + case.H) * case.G * case.H
    return 3.0 * f if case.pass_ == FORWARD_BACKWARD else f


@dataclass
class Problem:
    """Device tensors of one (cell, shape, dtype), shared by all providers and passes."""
    x: object  # [T, B, I]
    w_ih: object  # [G*H, I]
    w_hh: object  # [G*H, H]
    b_ih: object  # [G*H]
    b_hh: object  # [G*H]
    dy: object  # [T, B, H]


def make_problem(torch, cell, T, B, I, H, dtype: str, seed: int, device) -> Problem:
    """Uniform inputs at torch.nn's initial scale (weights in +-1/sqrt(H); x, dy in +-1),
    drawn in float32 on the device, then cast (the same values for every dtype)."""
    G = fusedrnn.CELLS[cell]
    gen = torch.Generator(device=device)
    gen.manual_seed(hash((seed, T, B, I, H, G)) & 0x7FFFFFFF)
    k = 1.0 / math.sqrt(H)
    tdtype = getattr(torch, dtype)

    def u(shape, scale):
        a = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
        return ((a * 2 - 1) * scale).to(tdtype)

    return Problem(x=u((T, B, I), 1.0), w_ih=u((G * H, I), k), w_hh=u((G * H, H), k),
                   b_ih=u((G * H,), k), b_hh=u((G * H,), k), dy=u((T, B, H), 1.0))


#: ``call()`` does one timed call and returns its raw result; ``outputs(result)``
#: names the result's tensors for the correctness check
Bound = Tuple[Callable[[], object], Callable[[object], Dict[str, object]]]


def bind_fusedrnn(case: Case, prob: Problem, algo: str, checkpoint: bool = False) -> Bound:
    """checkpoint: a checkpointed training step (fusedrnn.ckpt), whatever the pass."""
    from . import _device

    args = (case.cell, prob.x, prob.w_ih, prob.w_hh, prob.b_ih, prob.b_hh)
    if case.pass_ == FORWARD and not checkpoint:
        def call():
            return _device.forward(*args, training=False, algo=algo)

        def outputs(r):
            y, h_n, c_n, _ = r
            return _named(y=y, h_n=h_n, c_n=c_n)
    else:
        ck = {"checkpoint": True} if checkpoint else {}

        def call():
            y, h_n, c_n, cache = _device.forward(*args, training=True, algo=algo, **ck)
            return y, h_n, c_n, _device.backward(cache, prob.dy)

        def outputs(r):
            y, h_n, c_n, g = r
            return _named(y=y, h_n=h_n, c_n=c_n, dx=g["x"], dw_ih=g["w_ih"], dw_hh=g["w_hh"],
                          db_ih=g["b_ih"], db_hh=g["b_hh"])
    return call, outputs


def bind_torch(torch, case: Case, prob: Problem) -> Bound:
    """torch.nn.RNN/LSTM/GRU on the device with the same weights (same layout, gate order)."""
    kind, kwargs = _bench.TORCH_CELLS[case.cell]
    module = getattr(torch.nn, kind)(case.I, case.H, **kwargs).to(device=prob.x.device,
                                                                  dtype=prob.x.dtype)
    params = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    with torch.no_grad():
        for p, a in zip(params, (prob.w_ih, prob.w_hh, prob.b_ih, prob.b_hh)):
            p.copy_(a)
    module.flatten_parameters()

    def run(x):
        y, state = module(x)
        h_n, c_n = state if case.cell == "lstm" else (state, None)
        return y, h_n[0], (None if c_n is None else c_n[0])

    if case.pass_ == FORWARD:
        module.eval()  # cuDNN's inference path (no reserve space)

        def call():
            with torch.no_grad():
                return run(prob.x)

        def outputs(r):
            return _named(y=r[0], h_n=r[1], c_n=r[2])
    else:
        module.train()
        x = prob.x.detach().clone().requires_grad_(True)
        inputs = [x] + params

        def call():
            y, h_n, c_n = run(x)
            return y, h_n, c_n, torch.autograd.grad(y, inputs, grad_outputs=prob.dy)

        def outputs(r):
            y, h_n, c_n, (dx, dw_ih, dw_hh, db_ih, db_hh) = r
            return _named(y=y, h_n=h_n, c_n=c_n, dx=dx, dw_ih=dw_ih, dw_hh=dw_hh,
                          db_ih=db_ih, db_hh=db_hh)
    return call, outputs


def _named(**tensors) -> Dict[str, object]:
    return {k: v.detach() for k, v in tensors.items() if v is not None}


def rel_err(a: Dict[str, object], b: Dict[str, object]) -> Tuple[float, str]:
    """Worst max|a - b| / max|b| over the tensors both have (computed on the device)."""
    worst, where = 0.0, ""
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if tuple(x.shape) != tuple(y.shape):
            return math.inf, f"{k} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if y.numel() == 0:
            continue
        x, y = x.double(), y.double()
        diff = float((x - y).abs().max())
        scale = float(y.abs().max())
        e = 0.0 if diff == 0 else (diff / scale if scale > 0 else math.inf)
        if not e <= worst:  # also catches NaN
            worst, where = (math.inf if math.isnan(e) else e), k
    return worst, where


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def _time_sample(torch, call, n: int) -> float:
    """Seconds per call over n back-to-back calls, between two CUDA events on the current
    stream (so host-side launch overhead counts when the GPU waits for it)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start.record()
        for _ in range(n):
            call()
        end.record()
        end.synchronize()
    finally:
        if gc_was_enabled:
            gc.enable()
    return start.elapsed_time(end) / 1e3 / n


def time_interleaved(torch, calls: Dict[str, Callable[[], object]], repeats: int,
                     min_sample_s: float) -> Dict[str, Tuple[List[float], int]]:
    """Per provider: (seconds per call of each sample, calls per sample). Each provider
    has run once already (the check); one more call warms up and sizes its sample, then
    the samples go round-robin, starting one provider later each round."""
    per_sample = {}
    for name, call in calls.items():
        t = _time_sample(torch, call, 1)
        per_sample[name] = max(1, min(1000, math.ceil(min_sample_s / max(t, 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_time_sample(torch, calls[name], per_sample[name]))
    return {name: (samples[name], per_sample[name]) for name in names}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

@dataclass
class Row:
    device: str
    case: Case
    provider: str
    algo: str
    repeats: int
    ms: float = math.nan
    ms_min: float = math.nan
    ms_max: float = math.nan
    calls_per_sample: int = 0
    gflops: float = math.nan
    speedup_vs_torch: float = math.nan
    max_rel_err: float = math.nan
    check: str = "-"  # "ok", "MISMATCH(<array>)", "error: ...", or "-" (nothing to compare)

    def csv_record(self) -> Dict[str, object]:
        c = self.case
        g = _bench._g
        return {"device": self.device, "cell": c.cell, "T": c.T, "B": c.B, "I": c.I, "H": c.H,
                "pass": c.pass_, "dtype": c.dtype, "provider": self.provider, "algo": self.algo,
                "ms": g(self.ms), "ms_min": g(self.ms_min), "ms_max": g(self.ms_max),
                "calls_per_sample": self.calls_per_sample, "repeats": self.repeats,
                "gflops": g(self.gflops), "speedup_vs_torch": g(self.speedup_vs_torch),
                "max_rel_err": g(self.max_rel_err), "check": self.check}


_TABLE = (
    ("cell", 11, lambda r: r.case.cell),
    ("T", 4, lambda r: str(r.case.T)),
    ("B", 3, lambda r: str(r.case.B)),
    ("H", 5, lambda r: str(r.case.H)),
    ("dtype", 8, lambda r: r.case.dtype),
    ("pass", 16, lambda r: r.case.pass_),
    ("provider", 19, lambda r: r.provider),
    ("algo", 15, lambda r: r.algo),
    ("ms", 8, lambda r: _bench._fmt_ms(r.ms)),
    ("spread", 6, _bench._fmt_spread),  # (the CPU bench's: a Row has the same fields)
    ("GFLOP/s", 8, lambda r: _fmt_gflops(r.gflops)),
    ("vs torch", 8, lambda r: _bench._fmt_ratio(r.speedup_vs_torch)),
    ("check", 0, _bench._fmt_check),
)
_NUMERIC = {"T", "B", "H", "ms", "spread", "GFLOP/s", "vs torch"}


def _fmt_gflops(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def table_header() -> str:
    return _bench.table_header(_TABLE, _NUMERIC)


def table_row(r: Row) -> str:
    return _bench.table_row(r, _TABLE, _NUMERIC)


def write_csv(path: str, rows: Sequence[Row]) -> None:
    _bench.write_csv(path, rows, CSV_COLUMNS)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


class _Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy (the .txt file of the run)."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, s):
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def unavailable_reason(torch_module=None) -> Optional[str]:
    """Why the GPU benchmark cannot run here, or None when it can."""
    if not fusedrnn.cuda_available():
        return f"fusedrnn's CUDA backend is not usable: {fusedrnn.cuda_status()}"
    torch = torch_module if torch_module is not None else _bench.import_torch()
    if torch is None:
        return "the GPU benchmark compares against torch.nn on CUDA, but torch does not import"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (built for CUDA "
                f"{torch.version.cuda or 'none: a CPU-only build'})")
    return None


def run(args: argparse.Namespace, out=None) -> int:
    """Run the GPU benchmark described by parsed ``bench`` arguments; returns the exit status
    (2 when no GPU is usable, 1 when a provider failed or, with --strict, disagreed)."""
    out = out or sys.stdout
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: python -m fusedrnn bench --device cuda needs a CUDA GPU: {reason}",
              file=sys.stderr)
        return 2
    if not args.repeats:  # the default: 5 (the CPU benchmark takes 3 with --quick)
        args.repeats = 5
    try:
        shapes = (_bench.parse_shapes(args.shapes) if args.shapes
                  else [(T, B, H, H) for T, B, H in (QUICK_SHAPES if args.quick else FULL_SHAPES)])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch  # noqa: PLC0415 - checked above

    from . import _device  # noqa: PLC0415

    tee = _Tee(out)
    t_start = time.perf_counter()
    min_sample_s = (args.min_sample_ms if args.min_sample_ms is not None
                    else (2.0 if args.quick else 5.0)) / 1000.0
    dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _device._require_cuda()  # loads cuBLAS, so the header can name it
        _print_header(tee, torch, dev, name, args, min_sample_s)
        rows = _run_grid(torch, dev, name, args, shapes, min_sample_s, tee)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    _print_summary(tee, rows)
    print(f"total time {time.perf_counter() - t_start:.1f} s", file=tee)

    base = os.path.join(args.out, f"cuda-{slug(name)}")
    write_csv(base + ".csv", rows)
    with open(base + ".txt", "w") as f:
        f.write(tee.copy.getvalue())
    print(f"CSV written to {base}.csv, text to {base}.txt", file=out)

    errors = [r for r in rows if r.check.startswith("error")]
    mismatches = [r for r in rows if r.check.startswith("MISMATCH")]
    if mismatches:
        print(f"WARNING: {len(mismatches)} row(s) marked MISMATCH (beyond the bounds "
              f"{TOLERANCE} relative to scale)", file=sys.stderr)
    if errors:
        print(f"WARNING: {len(errors)} provider run(s) failed", file=sys.stderr)
    return 1 if errors or (mismatches and args.strict) else 0


def _print_header(out, torch, dev, name, args, min_sample_s):
    from . import _device  # noqa: PLC0415

    prop = torch.cuda.get_device_properties(dev)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"fusedrnn {fusedrnn.__version__} CUDA benchmark  "
          f"({time.strftime('%Y-%m-%d %H:%M:%S')}, Python {platform.python_version()})", file=out)
    print(f"GPU:      {name} ({dev}, sm_{prop.major}{prop.minor}, "
          f"{prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB)", file=out)
    print(f"torch:    {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}, "
          f"cudnn.enabled={torch.backends.cudnn.enabled})", file=out)
    print(f"fusedrnn: CUDA runtime {_device._cuda.runtime_version()}, cuBLAS "
          f"{_device._cuda.cublas_path() or '?'}", file=out)
    print("float32:  true float32 on both sides: torch.backends.cudnn.allow_tf32 = False and "
          "torch.backends.cuda.matmul.allow_tf32 = False; fusedrnn uses CUBLAS_COMPUTE_32F "
          "(no TF32)", file=out)
    print("bf16/f16: arrays in that type, float32 arithmetic (fusedrnn); torch: cuDNN's choice",
          file=out)
    print(f"setup:    I = H, x and dy uniform in [-1, 1], weights in +-1/sqrt(H); median of "
          f"{args.repeats} interleaved samples of >= {min_sample_s * 1e3:g} ms timed with CUDA "
          f"events, after a checked run and a warm-up; FLOPs 2*T*B*(I+H)*G*H fwd, x3 fwd+bwd; "
          f"'vs torch' = torch ms / row ms (> 1: faster than torch)", file=out)
    ignored = [f"--{k.replace('_', '-')}" for k, default in _CPU_ONLY
               if getattr(args, k, default) != default]
    if ignored:
        print(f"note:     ignored here (CPU benchmark only): {', '.join(ignored)}", file=out)
    print(file=out)
    print(table_header(), file=out, flush=True)


def providers_for(providers, cell: str, pass_: str) -> List[str]:
    """The providers that run a case: torch has no sigmoid RNN, and fusedrnn.ckpt is a
    training step (forward+backward only)."""
    return [n for n in providers if (n != "torch" or cell in _bench.TORCH_CELLS)
            and (n != "fusedrnn.ckpt" or pass_ != FORWARD)]


def _run_grid(torch, dev, dev_name, args, shapes, min_sample_s, out) -> List[Row]:
    rows: List[Row] = []
    providers = list(args.cuda_providers)
    for dtype in args.cuda_dtypes:
        for cell in args.cells:
            for T, B, I, H in shapes:
                prob = make_problem(torch, cell, T, B, I, H, dtype, args.seed, dev)
                for pass_ in args.passes:
                    case = Case(cell, T, B, I, H, dtype, pass_)
                    active = providers_for(providers, cell, pass_)
                    case_rows = _run_case(torch, dev, dev_name, case, prob, active, args.repeats,
                                          min_sample_s, out)
                    for r in case_rows:
                        print(table_row(r), file=out, flush=True)
                    rows.extend(case_rows)
                del prob
    return rows


def _algo_of(dev, case: Case, provider: str) -> str:
    from . import _device  # noqa: PLC0415

    if provider == "torch":
        return "cudnn"
    algo = ALGOS[provider]
    if algo == "auto":
        try:
            return "auto:" + _device._cuda.choose_algo(case.cell, case.dtype, case.T, case.B,
                                                       case.I, case.H, dev.index)
        except Exception:  # noqa: BLE001 - informational
            return "auto"
    return algo


def _benchmark_label(case: Case) -> str:
    """What benchmark mode picked for the case (after its first call), as
    bench:<forward> or bench:<forward>/<backward>."""
    from . import _device  # noqa: PLC0415

    passes = ["forward"] if case.pass_ == FORWARD else ["forward+cache", "backward"]
    try:
        table = _device._cuda.benchmark_table()
    except Exception:  # noqa: BLE001 - informational
        return "benchmark"
    picked = {e["pass"]: "cluster" if e["cluster"] else e["algo"] for e in table
              if (e["cell"], e["dtype"], e["T"], e["B"], e["I"], e["H"]) ==
              (case.cell, case.dtype, case.T, case.B, case.I, case.H)
              and not (e["lengths"] or e["mask"] or e["checkpoint"])}
    # (nothing recorded: only the standard algorithm could run)
    return "bench:" + "/".join(picked.get(p, "standard") for p in passes)


def _run_case(torch, dev, dev_name, case, prob, names, repeats, min_sample_s, out) -> List[Row]:
    """Check, then time, one case; one Row per provider that ran (or failed)."""
    rows: Dict[str, Row] = {}
    calls, outputs = {}, {}
    for n in names:
        row = Row(dev_name, case, n, _algo_of(dev, case, n), repeats)
        try:
            if n == "torch":
                call, named = bind_torch(torch, case, prob)
            else:
                ck = {"checkpoint": True} if n == "fusedrnn.ckpt" else {}
                call, named = bind_fusedrnn(case, prob, ALGOS[n], **ck)
            try:
                outputs[n] = named(call())  # first call: the check, and a warm-up
                if n == "fusedrnn.benchmark":
                    row.algo = _benchmark_label(case)
            except ValueError as e:
                if n == "fusedrnn.persistent" and "persistent" in str(e):
                    print(f"  note: fusedrnn.persistent does not fit {case.cell} T={case.T} "
                          f"B={case.B} H={case.H} {case.dtype} on this GPU; skipped", file=out)
                    continue
                raise
            calls[n] = call
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            row.check = f"error: {type(e).__name__}: {e}".splitlines()[0][:120]
        rows[n] = row

    base = "torch" if "torch" in outputs else next(iter(outputs), None)
    tol = TOLERANCE[case.dtype]
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
    outputs.clear()

    work = flops(case)
    for n, (samples, k) in time_interleaved(torch, calls, repeats, min_sample_s).items():
        r = rows[n]
        r.ms = 1e3 * statistics.median(samples)
        r.ms_min, r.ms_max = 1e3 * min(samples), 1e3 * max(samples)
        r.calls_per_sample = k
        r.gflops = work / (r.ms * 1e-3) / 1e9
    if "torch" in rows and not math.isnan(rows["torch"].ms):
        for r in rows.values():
            r.speedup_vs_torch = rows["torch"].ms / r.ms
    return list(rows.values())


def _print_summary(out, rows: Sequence[Row]) -> None:
    """Geometric-mean speedups vs torch per fusedrnn provider, dtype and pass."""
    print(file=out)
    keys = []
    for r in rows:
        k = (r.provider, r.case.dtype, r.case.pass_)
        if r.provider != "torch" and k not in keys:
            keys.append(k)
    for provider, dtype, pass_ in keys:
        vals = [r.speedup_vs_torch for r in rows
                if (r.provider, r.case.dtype, r.case.pass_) == (provider, dtype, pass_)
                and not math.isnan(r.speedup_vs_torch)]
        if vals:
            gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
            print(f"{provider} vs torch, {dtype} {pass_}: {gm:.2f}x (geometric mean over "
                  f"{len(vals)} cases)", file=out)

"""The optional CUDA backend: fusedrnn._cuda (C++/CUDA) and fusedrnn._device (Python).

Two parts.

Host-side tests run everywhere (no GPU, no driver needed):
- the extension imports and reports its state; its cuBLAS enum values equal
  those of the real cublas_api.h / library_types.h when a header is installed
  (nvidia-cublas wheel, CUDA toolkit, or FUSEDRNN_CUBLAS_INCLUDE=<dir>);
- argument checks of the device path on FAKE device arrays (objects with a
  ``__cuda_array_interface__`` whose pointers are never dereferenced): every
  wrong argument raises ValueError/TypeError naming it before a device is
  needed;
- the plumbing of fusedrnn._device against a fake ``_cuda`` module that
  records what it is called with (pointers, None -> 0, lengths as int32 host
  arrays, time-major uint8 masks, output shapes, streams, algo selection,
  backward's gradient buffers);
- ``python -m fusedrnn bench --device cuda`` without a GPU exits non-zero with
  a clear message; the GPU benchmark's bookkeeping runs on CPU tensors.

GPU tests (skipped with a reason unless fusedrnn.cuda_available() and torch
has CUDA) compare the device results (y, h_n, c_n and every gradient) with
``fusedrnn.reference`` in float64 on the SAME rounded inputs: inputs are drawn
in float64, cast to the device dtype, and the reference gets those rounded
values back in float64. Every cell x semantics x dtype x algorithm (standard,
persistent) on small shapes (T <= 7, B <= 5, H <= 24), plus one moderate
shape per cell (T=20, B=8, H=256) for the persistent kernel.

Tolerances, max|device - reference| / max|reference| per array (TOL below):
- float32: 1e-4 (DESIGN.md section 7). Arithmetic is float32 and cuBLAS runs
  CUBLAS_COMPUTE_32F without TF32, so observed errors should be ~1e-6.
- float16: 5e-3 and bfloat16: 3e-2 for these short sequences. The kernels keep
  h, y, the saved inputs and the per-step gate gradients in the array dtype
  (unit roundoff u = 2^-11 for float16, 2^-8 for bfloat16) and do everything
  else in float32, so each step adds O(u) relative error that the recurrence
  carries forward. Measured on these very problems (make_gpu_problem, same
  shapes and semantics, both algorithms) with the kernels' own code on the host
  emulator (fusedrnn._cuda_emu, tests/test_cuda_emulated.py), 6 seeds each:
  worst 8.1e-4 (float16, 1.7 u) and 6.2e-3 (bfloat16, 1.6 u), medians 4.7e-4
  and 3.8e-3; bfloat16 at T=20/B=8/H=256: 3.7e-3. A NumPy model of the same
  roundings over 300 problems per cell gave at most 1.1e-3 and 1.0e-2. The
  bounds (about 10 u and 8 u) leave a factor of about 5 for what the emulator
  cannot show (cuBLAS's own summation order and split-K reductions in the
  16-bit output type, device math functions).
- rnn_relu in float16/bfloat16: where a pre-activation lies within rounding
  distance of 0 the two computations may take different sides of the kink,
  which changes that step's derivative from 0 to 1 (gradient errors up to
  0.26 in the NumPy model; the forward stays within the bound: at most 3.9e-4
  and 3.5e-3 on the emulator). So the full comparison uses all-positive
  inputs and weights for rnn_relu in half precision (every unit active, no
  kink), and test_relu_half_forward checks the forward of random-sign problems.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _device, reference

from conftest import CELLS, GRAD_KEYS, assert_close, rel_err

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test dependency here
    torch = None

HAVE_EXT = _device._cuda is not None
GPU = bool(HAVE_EXT and fusedrnn.cuda_available() and torch is not None
           and torch.cuda.is_available())
if GPU:
    GPU_REASON = ""
elif not HAVE_EXT:
    GPU_REASON = "fusedrnn was built without its CUDA extension (fusedrnn._cuda)"
elif not fusedrnn.cuda_available():
    GPU_REASON = f"no usable CUDA device: {fusedrnn.cuda_status()}"
elif torch is None:
    GPU_REASON = "the GPU tests need torch"
else:
    GPU_REASON = f"torch {torch.__version__} has no CUDA device"

gpu = pytest.mark.skipif(not GPU, reason=GPU_REASON)
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="fusedrnn was built without its CUDA "
                                                     "extension (fusedrnn._cuda)")

#: relative to the result's scale; see the module docstring
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
DTYPES = ("float32", "float16", "bfloat16")
ALGOS = ("standard", "persistent")


# ==========================================================================
# Host side: the extension module
# ==========================================================================

@needs_ext
def test_extension_imports():
    import fusedrnn._cuda as m

    for name in ("device_count", "device_status", "device_name", "runtime_version",
                 "pointer_device", "load_cublas", "cublas_path", "cublas_values", "synchronize",
                 "memcpy_to_host", "memcpy_from_host", "DeviceBuffer", "Cache", "choose_algo",
                 "forward", "backward"):
        assert hasattr(m, name), name
    n = m.device_count()
    assert isinstance(n, int) and n >= 0
    assert isinstance(m.device_status(), str) and m.device_status()
    assert isinstance(m.runtime_version(), int)
    assert m.pointer_device(0) == -1
    host = np.zeros(16)
    assert m.pointer_device(host.ctypes.data) == -1  # host memory is not device memory


def test_cuda_status_is_a_string():
    s = fusedrnn.cuda_status()
    assert isinstance(s, str) and s
    assert isinstance(fusedrnn.cuda_available(), bool)
    if not HAVE_EXT:
        assert "without its CUDA extension" in s
        assert not fusedrnn.cuda_available()
    else:
        assert "CUDA extension built" in s


def test_status_without_extension(monkeypatch):
    monkeypatch.setattr(_device, "_cuda", None)
    assert not fusedrnn.cuda_available()
    assert "without its CUDA extension" in fusedrnn.cuda_status()


# --------------------------------------------------------------------------
# cuBLAS values against the real headers
# --------------------------------------------------------------------------

def _include_dirs():
    """Folders that may hold cuBLAS / CUDA headers: FUSEDRNN_CUBLAS_INCLUDE, the NVIDIA
    wheels on sys.path (nvidia/cu13/include, nvidia/cublas/include, ...), the toolkit."""
    dirs = []
    env = os.environ.get("FUSEDRNN_CUBLAS_INCLUDE")
    if env:
        dirs += env.split(os.pathsep)
    for p in sys.path:
        root = os.path.join(p or ".", "nvidia")
        if os.path.isdir(root):
            for sub in sorted(os.listdir(root)):
                d = os.path.join(root, sub, "include")
                if os.path.isdir(d):
                    dirs.append(d)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "include"))
    dirs += ["/usr/local/cuda/include", "/usr/include"]
    return dirs


def _find_header(name):
    for d in _include_dirs():
        f = os.path.join(d, name)
        if os.path.isfile(f):
            return f
    return None


def _enum_value(text, name):
    m = re.search(rf"\b{re.escape(name)}\s*=\s*(-?(?:0[xX][0-9a-fA-F]+|\d+))\b", text)
    return None if m is None else int(m.group(1), 0)


@needs_ext
def test_cublas_values_match_cublas_api_h():
    header = _find_header("cublas_api.h")
    if header is None:
        pytest.skip("no cublas_api.h installed (nvidia-cublas wheel or CUDA toolkit); "
                    "set FUSEDRNN_CUBLAS_INCLUDE=<folder with cublas_api.h> to check")
    text = open(header, errors="replace").read()
    values = _device._cuda.cublas_values()
    names = [k for k in values if k.startswith("CUBLAS_")]
    assert names
    for name in names:
        assert _enum_value(text, name) == values[name], (name, header)
    # the entry points cublas_dyn.cpp resolves with dlsym exist, and cublasGemmEx has
    # the 19 parameters its function-pointer type declares
    for fn in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetMathMode", "cublasGemmEx"):
        assert re.search(rf"\b{fn}\s*\(", text), fn
    decl = re.search(r"cublasStatus_t\s+CUBLASWINAPI\s+cublasGemmEx\s*\(([^;]*)\)\s*;", text)
    assert decl is not None and decl.group(1).count(",") + 1 == 19


@needs_ext
def test_cuda_data_types_match_library_types_h():
    header = _find_header("library_types.h")
    if header is None:
        pytest.skip("no library_types.h installed (CUDA toolkit or nvidia-cuda-runtime "
                    "wheel); set FUSEDRNN_CUBLAS_INCLUDE to check")
    text = open(header, errors="replace").read()
    values = _device._cuda.cublas_values()
    names = [k for k in values if k.startswith("CUDA_R_")]
    assert set(names) >= {"CUDA_R_32F", "CUDA_R_16F", "CUDA_R_16BF"}
    for name in names:
        assert _enum_value(text, name) == values[name], (name, header)


def test_enum_parser():
    text = "typedef enum {\n  CUBLAS_OP_N = 0,\n  CUBLAS_GEMM_DEFAULT = -1,\n" \
           "  CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,\n  CUBLAS_COMPUTE_32F = 68, /* x */\n" \
           "  CUBLAS_COMPUTE_32F_PEDANTIC = 69,\n  X = 0x10 };\n"
    assert _enum_value(text, "CUBLAS_GEMM_DEFAULT") == -1
    assert _enum_value(text, "CUBLAS_COMPUTE_32F") == 68
    assert _enum_value(text, "X") == 16
    assert _enum_value(text, "CUBLAS_OP_T") is None


# ==========================================================================
# Host side: fake device arrays and a fake _cuda module
# ==========================================================================

DEV1 = 0x7E0000000000  # fake pointers from here on live on "device 1"


class Dev:
    """A fake CUDA array: only ``__cuda_array_interface__``; its pointer is never read."""

    _next = 0x100000

    def __init__(self, shape, typestr="<f4", ptr=None, strides=None, stream=None):
        if ptr is None:
            Dev._next += 0x10000
            ptr = Dev._next
        self.ptr = ptr
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (ptr, False), "version": 3,
                                         "strides": strides}
        if stream is not None:
            self.__cuda_array_interface__["stream"] = stream


class FakeCore:
    """Stands for the _cuda.Cache that forward returns (the same attributes)."""

    def __init__(self, problem):
        algo = problem["algo"]
        self.algo = "standard" if algo == "auto" else algo
        self.nbytes = 4096
        for k in ("cell", "dtype", "T", "B", "I", "H", "batch_first", "reverse", "device"):
            setattr(self, k, problem[k])
        self.proj = bool(problem["w_hr"])
        self.checkpoint = problem["checkpoint"] if problem["training"] else 0
        self.P = problem["P"] if self.proj else problem["H"]


class FakeCuda(types.SimpleNamespace):
    """Stands for fusedrnn._cuda: one device, 'device memory' in host bytearrays, and
    forward/backward recording their arguments."""

    def __init__(self):
        super().__init__()
        self.mem = {}  # ptr -> bytearray
        self.next_ptr = 0x500000000
        self.forward_calls = []
        self.backward_calls = []
        self.loaded = []
        self.cublas = "x"
        self.count = 1
        fake = self

        class DeviceBuffer:
            def __init__(self, nbytes, device, stream=0):
                self.nbytes, self.device, self.stream = nbytes, device, stream
                self.ptr = fake.alloc(nbytes)

        self.DeviceBuffer = DeviceBuffer

    # memory
    def alloc(self, nbytes):
        ptr = self.next_ptr
        self.next_ptr += max(256, (nbytes + 255) // 256 * 256)
        self.mem[ptr] = bytearray(max(nbytes, 1))
        return ptr

    def put(self, a, typestr):
        """A fake device array holding a copy of host array a."""
        a = np.ascontiguousarray(a)
        ptr = self.alloc(a.nbytes)
        self.mem[ptr][:a.nbytes] = a.tobytes()
        return Dev(a.shape, typestr, ptr=ptr)

    def _region(self, ptr):
        for base, buf in self.mem.items():
            if base <= ptr < base + len(buf):
                return buf, ptr - base
        raise AssertionError(f"fake memcpy from unknown pointer {ptr:#x}")

    def memcpy_to_host(self, src, nbytes, stream):
        buf, off = self._region(src)
        return bytes(buf[off:off + nbytes])

    def memcpy_from_host(self, dst, src, stream):
        data = np.asarray(src).tobytes()
        buf, off = self._region(dst)
        buf[off:off + len(data)] = data

    # device queries
    def device_count(self):
        return self.count

    def device_status(self):
        return f"{self.count} CUDA device(s)"

    def runtime_version(self):
        return 13000

    def cublas_path(self):
        return self.cublas

    def load_cublas(self, d=""):
        self.loaded.append(d)

    def pointer_device(self, ptr):
        if not ptr:
            return -1
        return 1 if ptr >= DEV1 else 0

    def choose_algo(self, cell, dtype, T, B, I, H, device):
        return "standard"

    # kernels
    def forward(self, cell, dtype, T, B, I, H, reverse, batch_first, device, stream, x, w_ih,
                w_hh, b_ih, b_hh, h0, c0, lengths, mask, y, h_n, c_n, training, algo="auto",
                w_hr=0, P=0, checkpoint=0):
        self.forward_calls.append(dict(
            cell=cell, dtype=dtype, T=T, B=B, I=I, H=H, reverse=reverse, batch_first=batch_first,
            device=device, stream=stream, x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=h0,
            c0=c0, lengths=lengths, mask=mask, y=y, h_n=h_n, c_n=c_n, training=training,
            algo=algo, w_hr=w_hr, P=P, checkpoint=checkpoint))
        return FakeCore(self.forward_calls[-1]) if training else None

    def backward(self, cache, stream, dy, dh_n, dc_n, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh,
                 dw_hr=0):
        self.backward_calls.append(dict(
            cache=cache, stream=stream, dy=dy, dh_n=dh_n, dc_n=dc_n, dx=dx, dh0=dh0, dc0=dc0,
            dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dw_hr=dw_hr))


class DeviceNeeded(Exception):
    """Raised by the patched _require_cuda: validation let the call through to the device."""


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(_device, "_cuda", fake)
    monkeypatch.delenv("FUSEDRNN_CUDA_ALGO", raising=False)
    return fake


@pytest.fixture
def no_device(monkeypatch, fake_cuda):
    """Any use of a device after the checks fails the test with DeviceNeeded."""

    def need():
        raise DeviceNeeded

    def never(*a, **k):
        raise AssertionError("a kernel was called")

    monkeypatch.setattr(_device, "_require_cuda", need)
    fake_cuda.forward = fake_cuda.backward = never
    return fake_cuda


T_, B_, I_, H_ = 4, 3, 5, 6  # the fake problems' shape


def fake_call(cell="lstm", typestr="<f4", batch_first=False, T=T_, B=B_, I=I_, H=H_, **kw):
    """(args, kwargs) of a valid forward call on fake device arrays."""
    G = fusedrnn.CELLS[cell]
    args = {"x": Dev((B, T, I) if batch_first else (T, B, I), typestr),
            "w_ih": Dev((G * H, I), typestr), "w_hh": Dev((G * H, H), typestr),
            "b_ih": Dev((G * H,), typestr), "b_hh": Dev((G * H,), typestr),
            "h0": Dev((B, H), typestr), "c0": Dev((B, H), typestr) if cell == "lstm" else None}
    kw = dict({"batch_first": batch_first}, **kw)
    return args, kw


def host(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


GH = 4 * H_  # lstm
# (id, cell, change(args, kw), exception, message regex)
BAD_CALLS = [
    ("x_float64", "lstm", lambda a, k: a.update(x=Dev((T_, B_, I_), "<f8")), TypeError,
     r"x must have dtype float32, float16 or bfloat16 on a CUDA device, got float64"),
    ("x_int32", "lstm", lambda a, k: a.update(x=Dev((T_, B_, I_), "<i4")), TypeError,
     r"x must have dtype .* got int32"),
    ("x_complex", "lstm", lambda a, k: a.update(x=Dev((T_, B_, I_), "<c8")), TypeError,
     r"x has an unsupported element type '<c8'"),
    ("x_2d", "lstm", lambda a, k: a.update(x=Dev((T_, B_))), ValueError,
     r"x must have 3 dimensions \[T, B, I\], got shape \(4, 3\)"),
    ("x_2d_batch_first", "lstm", lambda a, k: (a.update(x=Dev((T_, B_))), k.update(batch_first=True)),
     ValueError, r"x must have 3 dimensions \[B, T, I\]"),
    ("x_I0", "lstm", lambda a, k: a.update(x=Dev((T_, B_, 0))), ValueError,
     r"x must have input size I >= 1"),
    ("x_noncontiguous", "lstm", lambda a, k: a.update(x=Dev((T_, B_, I_), strides=(4, 4 * T_, 4 * T_ * B_))),
     ValueError, r"x must be C-contiguous"),
    ("x_odd_strides", "lstm", lambda a, k: a.update(x=Dev((T_, B_, I_), strides=(60, 20, 3))),
     ValueError, r"x has strides \(60, 20, 3\) that are not a multiple of its element size 4"),
    ("w_ih_host", "lstm", lambda a, k: a.update(w_ih=host((GH, I_))), TypeError,
     r"w_ih is a host array \(ndarray\) but x is on CUDA device 0"),
    ("w_ih_none", "lstm", lambda a, k: a.update(w_ih=None), TypeError, r"w_ih is a host array"),
    ("w_hh_host", "lstm", lambda a, k: a.update(w_hh=host((GH, H_))), TypeError,
     r"w_hh is a host array"),
    ("b_ih_host", "lstm", lambda a, k: a.update(b_ih=host(GH)), TypeError, r"b_ih is a host array"),
    ("b_hh_host", "lstm", lambda a, k: a.update(b_hh=host(GH)), TypeError, r"b_hh is a host array"),
    ("h0_host", "lstm", lambda a, k: a.update(h0=host((B_, H_))), TypeError, r"h0 is a host array"),
    ("c0_host", "lstm", lambda a, k: a.update(c0=host((B_, H_))), TypeError, r"c0 is a host array"),
    ("h0_list", "gru", lambda a, k: a.update(h0=[[0.0] * H_] * B_), TypeError, r"h0 is a host array"),
    ("w_hh_1d", "lstm", lambda a, k: a.update(w_hh=Dev((GH,))), ValueError,
     r"w_hh must have 2 dimensions \[G\*H, H\], got shape \(24,\)"),
    ("w_hh_H0", "lstm", lambda a, k: a.update(w_hh=Dev((GH, 0))), ValueError,
     r"w_hh must have hidden size H >= 1"),
    ("w_hh_gates", "lstm", lambda a, k: a.update(w_hh=Dev((3 * H_, H_))), ValueError,
     r"w_hh must have shape \[G\*H, H\] with G=4 for cell 'lstm' = \(24, 6\), got \(18, 6\)"),
    ("w_hh_gates_gru", "gru", lambda a, k: a.update(w_hh=Dev((4 * H_, H_))), ValueError,
     r"w_hh must have shape \[G\*H, H\] with G=3 for cell 'gru' = \(18, 6\), got \(24, 6\)"),
    ("w_ih_columns", "lstm", lambda a, k: a.update(w_ih=Dev((GH, I_ + 1))), ValueError,
     r"w_ih must have shape \[G\*H, I\] with G=4, H=6, I=5 = \(24, 5\), got \(24, 6\)"),
    ("w_ih_rows", "rnn_tanh", lambda a, k: a.update(w_ih=Dev((2 * H_, I_))), ValueError,
     r"w_ih must have shape .* = \(6, 5\), got \(12, 5\)"),
    ("b_ih_shape", "lstm", lambda a, k: a.update(b_ih=Dev((GH, 1))), ValueError,
     r"b_ih must have shape \[G\*H\] = \(24,\), got \(24, 1\)"),
    ("b_hh_shape", "lstm", lambda a, k: a.update(b_hh=Dev((H_,))), ValueError,
     r"b_hh must have shape \[G\*H\] = \(24,\), got \(6,\)"),
    ("h0_shape", "lstm", lambda a, k: a.update(h0=Dev((B_ - 1, H_))), ValueError,
     r"h0 must have shape \[B, H\] = \(3, 6\), got \(2, 6\)"),
    ("h0_shape_batch_first", "gru",
     lambda a, k: (a.update(x=Dev((B_ + 1, T_, I_)), h0=Dev((B_, H_))), k.update(batch_first=True)),
     ValueError, r"h0 must have shape \[B, H\] = \(4, 6\), got \(3, 6\)"),
    ("c0_shape", "lstm", lambda a, k: a.update(c0=Dev((B_, H_ + 1))), ValueError,
     r"c0 must have shape \[B, H\] = \(3, 6\), got \(3, 7\)"),
    ("c0_for_gru", "gru", lambda a, k: a.update(c0=Dev((B_, H_))), ValueError,
     r"c0 is only used by cell 'lstm', got c0 for cell 'gru'"),
    ("w_ih_float16", "lstm", lambda a, k: a.update(w_ih=Dev((GH, I_), "<f2")), TypeError,
     r"w_ih has dtype float16 but x has dtype float32"),
    ("w_hh_float64", "lstm", lambda a, k: a.update(w_hh=Dev((GH, H_), "<f8")), TypeError,
     r"w_hh has dtype float64 but x has dtype float32"),
    ("h0_float16", "gru", lambda a, k: a.update(h0=Dev((B_, H_), "<f2")), TypeError,
     r"h0 has dtype float16 but x has dtype float32"),
    ("w_hh_device1", "lstm", lambda a, k: a.update(w_hh=Dev((GH, H_), ptr=DEV1 + 0x1000)),
     ValueError, r"w_hh is on CUDA device 1 but x is on CUDA device 0"),
    ("b_hh_device1", "lstm", lambda a, k: a.update(b_hh=Dev((GH,), ptr=DEV1 + 0x2000)),
     ValueError, r"b_hh is on CUDA device 1 but x is on CUDA device 0"),
    ("w_hr_for_gru", "gru", lambda a, k: k.update(w_hr=Dev((3, H_))), ValueError,
     r"w_hr \(projection\) is only used by cell 'lstm', got cell 'gru'"),
    ("w_hr_1d", "lstm", lambda a, k: k.update(w_hr=Dev((3,))), ValueError,
     r"w_hr must have shape \[P, H\] with P, H >= 1, got \(3,\)"),
    ("w_hr_host", "lstm", lambda a, k: k.update(w_hr=host((3, H_))), TypeError,
     r"w_hr is a host array"),
    ("w_hr_float16", "lstm", lambda a, k: k.update(w_hr=Dev((3, H_), "<f2")), TypeError,
     r"w_hr has dtype float16 but x has dtype float32"),
    ("w_hh_without_projection_size", "lstm", lambda a, k: k.update(w_hr=Dev((3, H_))), ValueError,
     r"w_hh must have shape \[4\*H, P\] with H=6, P=3 \(from w_hr \[P, H\]\) = \(24, 3\), "
     r"got \(24, 6\)"),
    ("h0_with_projection", "lstm",
     lambda a, k: (a.update(w_hh=Dev((GH, 3))), k.update(w_hr=Dev((3, H_)))), ValueError,
     r"h0 must have shape \[B, P\] = \(3, 3\), got \(3, 6\)"),
    ("checkpoint_zero", "gru", lambda a, k: k.update(checkpoint=0), ValueError,
     r"checkpoint must be a bool or a positive int \(steps between kept states\), got 0"),
    ("checkpoint_str", "gru", lambda a, k: k.update(checkpoint="yes"), TypeError,
     r"checkpoint must be a bool or a positive int"),
    ("lengths_above_T", "lstm", lambda a, k: k.update(lengths=np.array([4, 5, 0])), ValueError,
     r"lengths must lie in \[0, T\] = \[0, 4\], got 5"),
    ("lengths_negative", "gru", lambda a, k: k.update(lengths=[1, -1, 0]), ValueError,
     r"lengths must lie in \[0, T\] = \[0, 4\], got -1"),
    ("lengths_shape", "lstm", lambda a, k: k.update(lengths=np.array([1, 2, 3, 4])), ValueError,
     r"lengths must have shape \[B\] = \(3,\), got \(4,\)"),
    ("lengths_2d", "lstm", lambda a, k: k.update(lengths=np.ones((3, 1), np.int64)), ValueError,
     r"lengths must have shape \[B\] = \(3,\), got \(3, 1\)"),
    ("lengths_float", "lstm", lambda a, k: k.update(lengths=np.array([1.0, 2.0, 3.0])), TypeError,
     r"lengths must be integers, got dtype float64"),
    ("lengths_and_mask", "lstm",
     lambda a, k: k.update(lengths=[1, 2, 3], mask=np.ones((T_, B_), bool)), ValueError,
     r"pass either lengths or mask, not both"),
    ("mask_shape", "lstm", lambda a, k: k.update(mask=np.ones((B_, T_), bool)), ValueError,
     r"mask must have shape \[T, B\] = \(4, 3\), got \(3, 4\)"),
    ("mask_shape_batch_first", "lstm",
     lambda a, k: (a.update(x=Dev((B_, T_, I_))), k.update(batch_first=True, mask=np.ones((T_, B_), bool))),
     ValueError, r"mask must have shape \[B, T\] = \(3, 4\), got \(4, 3\)"),
    ("mask_int", "gru", lambda a, k: k.update(mask=np.ones((T_, B_), np.int32)), TypeError,
     r"mask must have dtype bool, got int32"),
    ("reverse_str", "lstm", lambda a, k: k.update(reverse="yes"), TypeError,
     r"reverse must be a bool, got str"),
    ("batch_first_int", "lstm", lambda a, k: k.update(batch_first=1), TypeError,
     r"batch_first must be a bool, got int"),
    ("training_none", "lstm", lambda a, k: k.update(training=None), TypeError,
     r"training must be a bool, got NoneType"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_fail_before_the_device(no_device, case):
    _, cell, change, exc, match = case
    args, kw = fake_call(cell)
    with pytest.raises(DeviceNeeded):  # the unchanged call passes every check
        fusedrnn.forward(cell, **args, **kw)
    change(args, kw)
    with pytest.raises(exc, match=match):
        fusedrnn.forward(cell, **args, **kw)


@pytest.mark.parametrize("cell,exc,match", [
    ("lsmt", ValueError, r"cell must be one of \['gru', 'lstm', 'rnn_relu', 'rnn_sigmoid', "
                         r"'rnn_tanh'\], got 'lsmt'"),
    (4, TypeError, r"cell must be a str"),
])
def test_bad_cell_fails_before_the_device(no_device, cell, exc, match):
    args, kw = fake_call("lstm")
    with pytest.raises(exc, match=match):
        fusedrnn.forward(cell, **args, **kw)


def test_torch_cpu_tensor_with_device_x(no_device):
    torch_ = pytest.importorskip("torch")
    args, kw = fake_call("gru")
    args["w_ih"] = torch_.zeros(3 * H_, I_)
    with pytest.raises(TypeError, match=r"w_ih is a host array \(Tensor\)"):
        fusedrnn.forward("gru", **args, **kw)


def test_host_x_with_device_weights_is_an_error():
    """x on the host takes the CPU path, which refuses a device array by name."""
    x = np.zeros((T_, B_, I_), np.float32)
    with pytest.raises((TypeError, ValueError), match="w_ih"):
        fusedrnn.forward("gru", x, Dev((3 * H_, I_)), np.zeros((3 * H_, H_), np.float32))


def test_valid_call_on_fake_arrays_needs_a_device_from_the_real_extension():
    """Here (no GPU): the checks pass, then a clear RuntimeError, not a crash."""
    if GPU:
        pytest.skip("this machine has a GPU: fake pointers would reach the kernels")
    args, kw = fake_call("lstm")
    with pytest.raises(RuntimeError, match="CUDA"):
        fusedrnn.forward("lstm", **args, **kw)


def test_valid_call_without_extension(monkeypatch):
    monkeypatch.setattr(_device, "_cuda", None)
    args, kw = fake_call("gru")
    with pytest.raises(RuntimeError, match="built without its CUDA extension"):
        fusedrnn.forward("gru", **args, **kw)
    args["h0"] = Dev((B_ + 1, H_))  # the checks still come first
    with pytest.raises(ValueError, match="h0 must have shape"):
        fusedrnn.forward("gru", **args, **kw)


def test_require_cuda(fake_cuda):
    fake_cuda.cublas = ""
    _device._require_cuda()
    assert fake_cuda.loaded == [_device._cublas_dir()]  # loads cuBLAS when not yet loaded
    fake_cuda.cublas = "libcublas.so.13"
    _device._require_cuda()
    assert len(fake_cuda.loaded) == 1
    fake_cuda.count = 0
    with pytest.raises(RuntimeError, match="no CUDA device is usable"):
        _device._require_cuda()


def test_is_device_array():
    class Raises:
        @property
        def __cuda_array_interface__(self):
            raise AttributeError("not on a device")

    assert _device.is_device_array(Dev((2,)))
    for a in (np.zeros(3), None, 1.0, [1.0], (1.0,), Raises()):
        assert not _device.is_device_array(a)
    if torch is not None:
        assert not _device.is_device_array(torch.zeros(3))


# --------------------------------------------------------------------------
# Plumbing against the fake module
# --------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_forward_backward_plumbing(fake_cuda, cell, batch_first):
    G = fusedrnn.CELLS[cell]
    args, kw = fake_call(cell, batch_first=batch_first)
    y, h_n, c_n, cache = fusedrnn.forward(cell, **args, **kw, lengths=[4, 0, 2])
    (f,) = fake_cuda.forward_calls
    assert (f["cell"], f["dtype"], f["T"], f["B"], f["I"], f["H"]) == (cell, "float32", T_, B_,
                                                                       I_, H_)
    assert (f["reverse"], f["batch_first"], f["device"], f["stream"]) == (False, batch_first, 0, 0)
    for name in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0"):
        assert f[name] == args[name].ptr, name
    assert f["c0"] == (args["c0"].ptr if cell == "lstm" else 0)
    assert isinstance(f["lengths"], np.ndarray) and f["lengths"].dtype == np.int32
    assert f["lengths"].flags.c_contiguous and f["lengths"].tolist() == [4, 0, 2]
    assert f["mask"] is None and f["training"] is True and f["algo"] == "auto"
    # outputs: fusedrnn-owned DeviceArrays (no allocating library behind a plain interface)
    assert isinstance(y, fusedrnn.DeviceArray) and isinstance(h_n, fusedrnn.DeviceArray)
    assert y.shape == ((B_, T_, H_) if batch_first else (T_, B_, H_))
    assert h_n.shape == (B_, H_) and y.dtype == h_n.dtype == "float32"
    assert y.__cuda_array_interface__["typestr"] == "<f4"
    assert (f["y"], f["h_n"]) == (y.ptr, h_n.ptr)
    if cell == "lstm":
        assert isinstance(c_n, fusedrnn.DeviceArray) and c_n.shape == (B_, H_)
        assert f["c_n"] == c_n.ptr
    else:
        assert c_n is None and f["c_n"] == 0
    assert isinstance(cache, _device.DeviceCache)
    assert cache.nbytes == 4096 and cache.algo == "standard"
    assert (cache.cell, cache.T, cache.B, cache.I, cache.H) == (cell, T_, B_, I_, H_)
    assert "DeviceCache" in repr(cache)

    dshape = (B_, T_, H_) if batch_first else (T_, B_, H_)
    dy, dh_n = Dev(dshape), Dev((B_, H_))
    dc_n = Dev((B_, H_)) if cell == "lstm" else None
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    (b,) = fake_cuda.backward_calls
    assert b["cache"] is cache._core and b["stream"] == 0
    assert (b["dy"], b["dh_n"]) == (dy.ptr, dh_n.ptr)
    assert b["dc_n"] == (dc_n.ptr if cell == "lstm" else 0)
    assert set(g) == set(GRAD_KEYS) and g["w_hr"] is None
    shapes = {"x": (B_, T_, I_) if batch_first else (T_, B_, I_), "h0": (B_, H_),
              "w_ih": (G * H_, I_), "w_hh": (G * H_, H_), "b_ih": (G * H_,), "b_hh": (G * H_,)}
    if cell == "lstm":
        shapes["c0"] = (B_, H_)
    else:
        assert g["c0"] is None and b["dc0"] == 0
    for k, shape in shapes.items():
        assert isinstance(g[k], fusedrnn.DeviceArray) and g[k].shape == shape, k
        assert g[k].dtype == "float32" and g[k].device == 0
        assert b["d" + k] == g[k].ptr, k

    # None -> null pointers (zeros), in forward and in backward
    fusedrnn.backward(cache, None)
    b = fake_cuda.backward_calls[-1]
    assert b["dy"] == b["dh_n"] == b["dc_n"] == 0
    args.update(b_ih=None, b_hh=None, h0=None, c0=None)
    fusedrnn.forward(cell, **args, **kw)
    f = fake_cuda.forward_calls[-1]
    assert f["b_ih"] == f["b_hh"] == f["h0"] == f["c0"] == 0
    assert f["lengths"] is None and f["mask"] is None


def test_backward_checks(fake_cuda):
    args, kw = fake_call("gru")
    *_, cache = fusedrnn.forward("gru", **args, **kw)
    for bad, exc, match in [
        ((Dev((T_, B_, H_ + 1)),), ValueError, r"dy must have shape \[T, B, H\] = \(4, 3, 6\), "
                                               r"got \(4, 3, 7\)"),
        ((Dev((T_, B_, H_), "<f2"),), TypeError, r"dy has dtype float16 but x has dtype float32"),
        ((host((T_, B_, H_)),), TypeError, r"dy is a host array"),
        ((None, Dev((B_, H_ + 1))), ValueError, r"dh_n must have shape \[B, H\] = \(3, 6\)"),
        ((None, None, Dev((B_, H_))), ValueError, r"dc_n is only used by cell 'lstm'"),
        ((Dev((T_, B_, H_), ptr=DEV1 + 0x3000),), ValueError,
         r"dy is on CUDA device 1 but x is on CUDA device 0"),
    ]:
        with pytest.raises(exc, match=match):
            fusedrnn.backward(cache, *bad)
    assert not fake_cuda.backward_calls
    args, kw = fake_call("lstm", batch_first=True)
    *_, cache = fusedrnn.forward("lstm", **args, **kw)
    with pytest.raises(ValueError, match=r"dy must have shape \[B, T, H\] = \(3, 4, 6\)"):
        fusedrnn.backward(cache, Dev((T_, B_, H_)))


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_projection_and_checkpoint_plumbing(fake_cuda, batch_first):
    """LSTM with w_hr [P, H]: its pointer and P reach the kernels; y, h_n and dh0 have
    P columns, c_n and dc0 H; w_hh's gradient is [4H, P], and w_hr's comes back.
    checkpoint: the interval k reaches the kernels."""
    P = 2
    args, kw = fake_call("lstm", batch_first=batch_first)
    args.update(w_hh=Dev((GH, P)), h0=Dev((B_, P)))
    w_hr = Dev((P, H_))
    y, h_n, c_n, cache = fusedrnn.forward("lstm", **args, **kw, w_hr=w_hr)
    (f,) = fake_cuda.forward_calls
    assert (f["w_hr"], f["P"], f["H"], f["algo"]) == (w_hr.ptr, P, H_, "auto")
    assert y.shape == ((B_, T_, P) if batch_first else (T_, B_, P))
    assert (h_n.shape, c_n.shape, cache.P, cache.H) == ((B_, P), (B_, H_), P, H_)
    with pytest.raises(ValueError, match=r"dy must have shape \[(B, T|T, B), P\]"):
        fusedrnn.backward(cache, Dev((B_, T_, H_) if batch_first else (T_, B_, H_)))
    g = fusedrnn.backward(cache, Dev(y.shape), Dev((B_, P)), Dev((B_, H_)))
    (b,) = fake_cuda.backward_calls
    shapes = {"h0": (B_, P), "c0": (B_, H_), "w_hh": (GH, P), "w_hr": (P, H_)}
    for k, shape in shapes.items():
        assert g[k].shape == shape and b["d" + k] == g[k].ptr, k
    # the persistent forward projects too: algo and w_hr reach the kernels
    _device.forward("lstm", **args, **kw, w_hr=w_hr, algo="persistent")
    assert len(fake_cuda.forward_calls) == 2
    assert (fake_cuda.forward_calls[1]["w_hr"], fake_cuda.forward_calls[1]["algo"]) == (
        w_hr.ptr, "persistent")
    assert fake_cuda.forward_calls[0]["checkpoint"] == 0
    # checkpoint: k reaches the kernels (True: ceil(sqrt(T)) = 2), only when training
    for ck, want in ((True, 2), (3, 3), (False, 0)):
        fusedrnn.forward("lstm", **args, **kw, w_hr=w_hr, checkpoint=ck)
        assert fake_cuda.forward_calls[-1]["checkpoint"] == want
    fusedrnn.forward("lstm", **args, **kw, w_hr=w_hr, checkpoint=3, training=False)
    assert fake_cuda.forward_calls[-1]["checkpoint"] == 0
    # without projection nothing changes: w_hr 0, P = H, no dw_hr
    fusedrnn.backward(fusedrnn.forward("lstm", **fake_call("lstm")[0])[3], None)
    assert (fake_cuda.forward_calls[-1]["w_hr"], fake_cuda.forward_calls[-1]["P"]) == (0, H_)
    assert fake_cuda.backward_calls[-1]["dw_hr"] == 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_mask_goes_time_major_uint8(fake_cuda, batch_first):
    rng = np.random.default_rng(0)
    mask = rng.random((B_, T_) if batch_first else (T_, B_)) < 0.5
    args, kw = fake_call("gru", batch_first=batch_first)
    fusedrnn.forward("gru", **args, **kw, mask=mask)
    m = fake_cuda.forward_calls[-1]["mask"]
    assert m.dtype == np.uint8 and m.shape == (T_, B_) and m.flags.c_contiguous
    np.testing.assert_array_equal(m, (mask.T if batch_first else mask).astype(np.uint8))
    assert fake_cuda.forward_calls[-1]["lengths"] is None
    # the same mask as a device array
    args, kw = fake_call("gru", batch_first=batch_first)
    fusedrnn.forward("gru", **args, **kw, mask=fake_cuda.put(mask, "|b1"))
    np.testing.assert_array_equal(fake_cuda.forward_calls[-1]["mask"], m)


def test_lengths_forms(fake_cuda):
    want = [3, 0, 4]
    forms = [want, np.array(want, np.int64), np.array(want, np.uint8), np.array(want, np.int32),
             fake_cuda.put(np.array(want, np.int64), "<i8"),
             fake_cuda.put(np.array(want, np.int32), "<i4")]
    if torch is not None:
        forms.append(torch.tensor(want))
    for lengths in forms:
        args, kw = fake_call("lstm")
        fusedrnn.forward("lstm", **args, **kw, lengths=lengths)
        got = fake_cuda.forward_calls[-1]["lengths"]
        assert got.dtype == np.int32 and got.tolist() == want, type(lengths)


def test_algo_selection(fake_cuda, monkeypatch):
    def algo_of(**extra):
        args, kw = fake_call("gru")
        _device.forward("gru", **args, **kw, **extra)
        return fake_cuda.forward_calls[-1]["algo"]

    assert algo_of() == "auto"
    for a in ("standard", "persistent", "benchmark", "auto"):
        monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", a)
        assert algo_of() == a
        args, kw = fake_call("gru")
        fusedrnn.forward("gru", **args, **kw)  # the public entry point reads it too
        assert fake_cuda.forward_calls[-1]["algo"] == a
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "persistent")
    assert algo_of(algo="standard") == "standard"  # the argument wins over the environment
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "")
    assert algo_of() == "auto"
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "fastest")
    with pytest.raises(ValueError, match=r"FUSEDRNN_CUDA_ALGO must be auto, standard, "
                                         r"persistent or benchmark, got 'fastest'"):
        algo_of()


def test_streams_and_inference(fake_cuda):
    args, kw = fake_call("lstm")
    args["x"] = Dev((T_, B_, I_), stream=0xABC)
    y, h_n, c_n, cache = fusedrnn.forward("lstm", **args, **kw, training=False)
    f = fake_cuda.forward_calls[-1]
    assert cache is None and f["training"] is False
    assert f["stream"] == 0xABC  # the stream the producer named
    assert y._buf.stream == 0xABC and y.__cuda_array_interface__["stream"] == 0xABC
    *_, cache = fusedrnn.forward("lstm", **args, **kw)
    fusedrnn.backward(cache, Dev((T_, B_, H_), stream=0xDEF))
    assert fake_cuda.backward_calls[-1]["stream"] == 0xDEF  # dy's stream
    fusedrnn.backward(cache, None)
    assert fake_cuda.backward_calls[-1]["stream"] == 0xABC  # else forward's


def test_zero_size_shapes_reach_the_kernels(fake_cuda):
    for T, B in ((0, 3), (4, 0)):
        args, kw = fake_call("lstm", T=T, B=B)
        y, h_n, c_n, cache = fusedrnn.forward("lstm", **args, **kw)
        f = fake_cuda.forward_calls[-1]
        assert (f["T"], f["B"]) == (T, B)
        assert y.shape == (T, B, H_) and h_n.shape == c_n.shape == (B, H_)
        g = fusedrnn.backward(cache, None)
        assert g["x"].shape == (T, B, I_) and g["w_hh"].shape == (4 * H_, H_)


def test_zero_size_arrays_with_null_pointers(fake_cuda):
    """Size-0 arrays may carry a null data pointer (the __cuda_array_interface__ spec allows
    it, CuPy does it); their device is then unknown, and the call runs on the weights'."""
    for T, B in ((0, B_), (T_, 0)):
        args, kw = fake_call("lstm", T=T, B=B)
        args["x"] = Dev((T, B, I_), ptr=0)
        if B == 0:
            args["h0"], args["c0"] = Dev((0, H_), ptr=0), Dev((0, H_), ptr=0)
        y, h_n, c_n, cache = fusedrnn.forward("lstm", **args, **kw)
        f = fake_cuda.forward_calls[-1]
        assert (f["T"], f["B"], f["device"], f["x"]) == (T, B, 0, 0)
        assert y.shape == (T, B, H_) and h_n.shape == (B, H_)
        fusedrnn.backward(cache, Dev((T, B, H_), ptr=0))
        assert fake_cuda.backward_calls[-1]["dy"] == 0


def test_device_array(fake_cuda):
    a = fusedrnn.DeviceArray((2, 3), "float16", 0, stream=7)
    cai = a.__cuda_array_interface__
    assert cai == {"shape": (2, 3), "typestr": "<f2", "data": (a.ptr, False), "version": 3,
                   "strides": None, "stream": 7}
    assert a.nbytes == 12 and "float16" in repr(a)
    assert fusedrnn.DeviceArray((4,), "float32", 0).__cuda_array_interface__["stream"] is None
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5))
    for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16)):
        d = fusedrnn.DeviceArray.from_host(x, dtype=dtype)
        assert d.shape == (3, 5) and d.dtype == dtype
        back = d.get()
        assert back.dtype == np_dtype
        np.testing.assert_array_equal(back, x.astype(np_dtype))
    assert fusedrnn.DeviceArray.from_host(x.astype(np.float32)).dtype == "float32"


def test_device_array_bfloat16_rounds_to_nearest_even(fake_cuda):
    v = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 0.0, -0.0, 3e38,
                  1e-40], np.float32)
    d = fusedrnn.DeviceArray.from_host(v, dtype="bfloat16")
    assert d.__cuda_array_interface__["typestr"] == "<V2" and d.nbytes == 2 * v.size
    bits = np.frombuffer(fake_cuda.memcpy_to_host(d.ptr, d.nbytes, 0), np.uint16)
    assert [hex(b) for b in bits[:7]] == ["0x3f80", "0x3f80", "0x3f82", "0x3f81", "0xc020",
                                          "0x0", "0x8000"]
    back = d.get()
    assert back.dtype == np.float32 and back.shape == v.shape
    np.testing.assert_array_equal(back[:7], [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, 0.0, -0.0])
    if torch is not None:  # the same rounding as torch's (finite values)
        want = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(bits, want)


# --------------------------------------------------------------------------
# The GPU benchmark's command line, without a GPU
# --------------------------------------------------------------------------

def test_bench_device_cuda_without_gpu_exits_with_a_message(tmp_path, capsys):
    if GPU:
        pytest.skip("this machine has a GPU (test_gpu_bench_quick runs the benchmark)")
    from fusedrnn.__main__ import main

    rc = main(["bench", "--device", "cuda", "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bench --device cuda needs a CUDA GPU" in err
    assert not (tmp_path / "o").exists()


def test_bench_device_cuda_cli_subprocess(tmp_path):
    if GPU:
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "fusedrnn", "bench", "--device", "cuda", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "needs a CUDA GPU" in r.stderr


PERSISTENT_UNITS = Path(__file__).resolve().parent.parent / "bench" / "persistent_units.py"


def test_persistent_units_sweep_without_gpu_exits_with_a_message(tmp_path):
    if GPU:
        pytest.skip("this machine has a GPU (test_persistent_units_sweep_quick runs it)")
    r = subprocess.run([sys.executable, str(PERSISTENT_UNITS), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no GPU" in r.stderr or "needs torch" in r.stderr
    assert not list(tmp_path.iterdir())


@gpu
def test_persistent_units_sweep_quick(tmp_path):
    """bench/persistent_units.py --quick: every variant it times matches torch.nn."""
    r = subprocess.run([sys.executable, str(PERSISTENT_UNITS), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("lstm", "rnn_tanh"))]
    assert {row[4] for row in rows} >= {"units>=1", "standard", "torch"}, r.stdout
    for row in rows:
        if row[4] != "torch":
            assert float(row[-1]) < 1e-4, row  # (the check column: error against torch.nn)
    assert len(list(tmp_path.glob("persistent-units-*.txt"))) == 1


RULE_REPORT = PERSISTENT_UNITS.parent / "rule_report.py"
RESULTS = PERSISTENT_UNITS.parent / "results"


def rule_report(*args):
    r = subprocess.run([sys.executable, str(RULE_REPORT), *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def test_rule_report_on_the_h200_results():
    """bench/rule_report.py reproduces the counts docs/cuda.md gives for the H200 runs:
    13 of 108 cases slower than cuDNN; at B = 16, the rule's pick within 5% of the
    faster algorithm in 31 of 36 cases, the worst 1.99x."""
    rc, out, err = rule_report(RESULTS / "cuda-nvidia-h200.csv")
    assert rc == 0, err
    assert "auto slower than torch: 13 of 108;" in out
    rc, out, err = rule_report(RESULTS / "cuda-nvidia-h200-b16.csv")
    assert rc == 0, err
    assert "within 5% of the faster algorithm: 31 of 36" in out
    assert ("worst miss: rnn_tanh 100 16 1024 bfloat16 forward: persistent took 1.99x "
            "standard's time") in out
    assert "faster algorithm, lstm float32" in out


def test_rule_report_counts_misses_and_benchmark_mode(tmp_path):
    """A made-up CSV: auto picks the slower algorithm in one case of two, benchmark
    mode the faster in both; failed rows are left out."""
    cols = ("device,cell,T,B,I,H,pass,dtype,provider,algo,ms,ms_min,ms_max,calls_per_sample,"
            "repeats,gflops,speedup_vs_torch,max_rel_err,check")
    rows = []
    for H, std, per, pick in ((256, 2.0, 1.0, "persistent"), (512, 2.0, 1.0, "standard")):
        case = f"X,lstm,100,8,{H},{H},forward,float32"
        rows += [f"{case},fusedrnn,auto:{pick},{std if pick == 'standard' else per},,,,,,,,ok",
                 f"{case},fusedrnn.standard,standard,{std},,,,,,,,ok",
                 f"{case},fusedrnn.persistent,persistent,{per},,,,,,,,ok",
                 f"{case},fusedrnn.benchmark,bench:persistent,{per},,,,,,,,ok",
                 f"{case},torch,cudnn,1.5,,,,,,,,ok",
                 f"{case},fusedrnn.ckpt,auto,0.001,,,,,,,,error: failed"]
    path = tmp_path / "r.csv"
    path.write_text("\n".join([cols, *rows]) + "\n")
    rc, out, err = rule_report(path)
    assert rc == 0, err
    assert "within 5% of the faster algorithm: 1 of 2" in out
    assert "worst miss: lstm 100 8 512 float32 forward: standard took 2.00x persistent's" in out
    assert "benchmark mode within 5% of the faster algorithm: 2 of 2" in out
    # auto at 1.0 ms and 2.0 ms against torch's 1.5 ms: one below 1x, both below 2x (B = 8)
    assert "auto slower than torch: 1 of 2; below the target (1x, 2x at B <= 8): 2;" in out
    assert "      8      P/-      P/-" in out
    empty = tmp_path / "e.csv"
    empty.write_text(cols + "\n")
    assert rule_report(empty)[0] == 1


def test_bench_cuda_options_parse():
    from fusedrnn.__main__ import build_parser
    from fusedrnn import _bench_cuda

    p = build_parser()
    a = p.parse_args(["bench"])
    assert a.device == "cpu" and a.cuda_dtypes == ["float32", "bfloat16"]
    assert a.cuda_providers == list(_bench_cuda.DEFAULT_PROVIDERS)
    assert set(_bench_cuda.PROVIDERS) - set(_bench_cuda.DEFAULT_PROVIDERS) == {"fusedrnn.ckpt"}
    a = p.parse_args(["bench", "--device", "cuda", "--cuda-dtypes", "bfloat16,float16",
                      "--cuda-providers", "fusedrnn,torch", "--out", "x"])
    assert (a.device, a.cuda_dtypes, a.cuda_providers, a.out) == (
        "cuda", ["bfloat16", "float16"], ["fusedrnn", "torch"], "x")
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--cuda-dtypes", "float64"])
    assert len(_bench_cuda.FULL_SHAPES) == 9
    assert {B for _, B, _ in _bench_cuda.FULL_SHAPES} == {1, 8, 64}
    assert {H for _, _, H in _bench_cuda.FULL_SHAPES} == {256, 512, 1024}
    case = _bench_cuda.Case("lstm", 100, 8, 256, 256, "float32", "forward")
    assert _bench_cuda.flops(case) == 2.0 * 100 * 8 * 512 * 4 * 256
    case = _bench_cuda.Case("gru", 100, 8, 256, 256, "float32", "forward+backward")
    assert _bench_cuda.flops(case) == 3 * 2.0 * 100 * 8 * 512 * 3 * 256
    assert _bench_cuda.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_bench_cuda_bookkeeping_on_cpu_tensors(monkeypatch, tmp_path):
    """The GPU benchmark's case logic (binding, checking, interleaved timing, table, CSV)
    on CPU tensors: fusedrnn's CPU backend stands in for the device providers."""
    import csv
    import io

    torch_ = pytest.importorskip("torch")
    from fusedrnn import _bench_cuda as bc

    def time_sample(torch_mod, call, n):
        import time
        t = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t) / n

    seen_ck = []

    def bind_cpu(case, prob, algo, checkpoint=False):
        seen_ck.append((case.pass_, checkpoint))
        if algo == "persistent":
            def fail():
                raise ValueError("algo 'persistent' cannot run this problem on this device")
            return fail, None
        a = [t.numpy() for t in (prob.x, prob.w_ih, prob.w_hh, prob.b_ih, prob.b_hh)]
        t = torch_.from_numpy

        def call():
            y, h, c, cache = fusedrnn.forward(case.cell, *a, checkpoint=checkpoint,
                                              training=case.pass_ != "forward")
            g = None if cache is None else fusedrnn.backward(cache, prob.dy.numpy())
            return y, h, c, g

        def named(r):
            y, h, c, g = r
            out = dict(y=t(y), h_n=t(h), c_n=None if c is None else t(c))
            if g is not None:
                out.update(dx=t(g["x"]), dw_ih=t(g["w_ih"]), dw_hh=t(g["w_hh"]),
                           db_ih=t(g["b_ih"]), db_hh=t(g["b_hh"]))
            return bc._named(**out)
        return call, named

    monkeypatch.setattr(bc, "_time_sample", time_sample)
    monkeypatch.setattr(bc, "bind_fusedrnn", bind_cpu)
    out = io.StringIO()
    rows = []
    cpu = torch_.device("cpu")
    for cell in ("lstm", "gru", "rnn_sigmoid"):
        prob = bc.make_problem(torch_, cell, 6, 3, 5, 7, "float32", 0, cpu)
        for pass_ in bc.PASSES:
            case = bc.Case(cell, 6, 3, 5, 7, "float32", pass_)
            names = bc.providers_for(bc.PROVIDERS, cell, pass_)
            rows += bc._run_case(torch_, cpu, "test-cpu", case, prob, names, 2, 0.0, out)
    assert ("forward+backward", True) in seen_ck and ("forward", True) not in seen_ck
    assert all(r.algo == "auto" for r in rows if r.provider == "fusedrnn.ckpt")
    # (nothing timed here: benchmark mode's table is empty, so the label says standard)
    assert {r.algo for r in rows if r.provider == "fusedrnn.benchmark"} == {
        "bench:standard", "bench:standard/standard"}
    text = out.getvalue()
    assert "fusedrnn.persistent does not fit lstm" in text
    assert not any(r.provider == "fusedrnn.persistent" for r in rows)
    assert not any(r.provider == "torch" and r.case.cell == "rnn_sigmoid" for r in rows)
    for r in rows:
        assert r.check == "ok", (r.provider, r.case, r.check)
        assert r.ms > 0 and r.gflops > 0 and r.calls_per_sample >= 1
        if r.case.cell != "rnn_sigmoid":
            assert r.speedup_vs_torch > 0
    table = bc.table_header() + "\n" + "\n".join(bc.table_row(r) for r in rows)
    assert "vs torch" in table and "fusedrnn.standard" in table
    bc._print_summary(out, rows)
    assert "fusedrnn vs torch, float32 forward" in out.getvalue()
    path = tmp_path / "r.csv"
    bc.write_csv(str(path), rows)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bc.CSV_COLUMNS
        assert len(list(reader)) == len(rows)


# ==========================================================================
# GPU tests
# ==========================================================================

TORCH_DTYPE = {} if torch is None else {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}

#: the option combinations each cell, dtype and algorithm runs
GPU_SEMANTICS = {
    "plain": {},
    "reverse": {"reverse": True},
    "batch_first": {"batch_first": True},
    "lengths_sorted": {"lengths": "sorted"},
    "lengths_unsorted": {"lengths": "unsorted"},
    "reverse_lengths": {"reverse": True, "lengths": "unsorted"},
    "batch_first_lengths": {"batch_first": True, "lengths": "sorted"},
    "mask": {"mask": True},
    "reverse_mask": {"reverse": True, "mask": True},
    "batch_first_mask": {"batch_first": True, "mask": True},
    "no_state": {"no_state": True},
    "no_bias": {"no_bias": True},
}


def make_gpu_problem(cell, T, B, I, H, rng, lengths=None, mask=False, reverse=False,
                     batch_first=False, no_state=False, no_bias=False, positive=False, proj=0):
    """float64 inputs: ([x, w_ih, w_hh, b_ih, b_hh, h0, c0], kwargs, dy, dh_n, dc_n).

    Weights uniform in +-1/sqrt(H) (torch.nn's scale), x and dy standard normal, h0/c0
    and dh_n/dc_n of scale 0.5. lengths: "sorted" (longest first) or "unsorted", both
    with a 0 and a T when B >= 2. positive: all inputs and weights >= 0 and biases
    >= 0.1 (every rnn_relu unit active), with W_hh scaled to keep the state bounded.
    proj=P > 0 (lstm): a projection w_hr [P, H] in kwargs (torch.nn's scale); the state
    then has P values.
    """
    G = fusedrnn.CELLS[cell]
    k = 1.0 / math.sqrt(H)
    P = proj or H
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
    w_ih = rng.uniform(-k, k, (G * H, I))
    w_hh = rng.uniform(-k, k, (G * H, P))
    b_ih, b_hh = rng.uniform(-k, k, G * H), rng.uniform(-k, k, G * H)
    h0 = 0.5 * rng.standard_normal((B, P))
    c0 = 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None
    if positive:
        x, w_ih, h0 = np.abs(x), np.abs(w_ih), np.abs(h0)
        w_hh = np.abs(w_hh) * k
        b_ih, b_hh = 0.1 + np.abs(b_ih), 0.1 + np.abs(b_hh)
    if no_bias:
        b_ih = b_hh = None
    if no_state:
        h0 = c0 = None
    kw = {"reverse": reverse, "batch_first": batch_first}
    if proj:
        kw["w_hr"] = rng.uniform(-k, k, (P, H))
    if lengths:
        lens = np.sort(rng.integers(0, T + 1, size=B))[::-1].copy()
        if B >= 2:
            lens[0], lens[-1] = T, 0
        if lengths == "unsorted" and B >= 3:
            lens = np.roll(lens, 2)  # T and 0 inside, not ordered
        kw["lengths"] = lens
    if mask:
        kw["mask"] = rng.random((B, T) if batch_first else (T, B)) < 0.7
    dy = rng.standard_normal((B, T, P) if batch_first else (T, B, P))
    dh_n = 0.5 * rng.standard_normal((B, P))
    dc_n = 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None
    return [x, w_ih, w_hh, b_ih, b_hh, h0, c0], kw, dy, dh_n, dc_n


def to_dev(a, dtype):
    """float64 host array -> torch tensor of dtype on the current CUDA device (None stays)."""
    if a is None:
        return None
    return torch.from_numpy(np.asarray(a, np.float64)).to(TORCH_DTYPE[dtype]).cuda()


def to_host(t):
    """A tensor's values in float64 on the host (exact for every device dtype)."""
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def _forward_or_skip(cell, dev_args, kw, algo):
    try:
        return _device.forward(cell, *dev_args, **kw, algo=algo)
    except ValueError as e:
        if algo == "persistent" and "persistent" in str(e):
            pytest.skip(f"the persistent kernel does not fit this problem here: {e}")
        raise


def check_gpu(cell, problem, dtype, algo, tol=None, forward_only=False):
    """Run the problem on the device and the reference on the same rounded inputs; compare
    every output and gradient. Returns (device args, device outputs, cache, grads)."""
    args, kw, dy, dh_n, dc_n = problem
    tol = TOL[dtype] if tol is None else tol
    dev = [to_dev(a, dtype) for a in args]
    kw = {**kw, "w_hr": to_dev(kw.get("w_hr"), dtype)}  # projection (or None)
    ddy, ddh, ddc = to_dev(dy, dtype), to_dev(dh_n, dtype), to_dev(dc_n, dtype)
    y, h_n, c_n, cache = _forward_or_skip(cell, dev, kw, algo)
    grads = None if forward_only else _device.backward(cache, ddy, ddh, ddc)
    torch.cuda.synchronize()

    rounded = [to_host(a) for a in dev]
    ry, rh, rc, rcache = reference.forward(cell, *rounded, **{**kw, "w_hr": to_host(kw["w_hr"])})
    tdt = TORCH_DTYPE[dtype]
    x = dev[0]
    for name, a, r in (("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc)):
        if r is None:
            assert a is None, name
            continue
        assert isinstance(a, torch.Tensor) and a.device == x.device and a.dtype == tdt, name
        assert tuple(a.shape) == r.shape, name
        assert_close(name, to_host(a), r, tol)
    assert isinstance(cache, _device.DeviceCache) and cache.nbytes >= 0
    if algo not in ("auto", "benchmark") and args[0].shape[0] * args[0].shape[1] > 0:
        # (T*B = 0: nothing ran; auto and benchmark pick one)
        assert cache.algo == algo
    if forward_only:
        return dev, (y, h_n, c_n), cache, None
    rg = reference.backward(rcache, to_host(ddy), to_host(ddh), to_host(ddc))
    assert set(grads) == set(GRAD_KEYS)
    for k in GRAD_KEYS:
        if rg[k] is None:
            assert grads[k] is None, k
            continue
        g = grads[k]
        assert isinstance(g, torch.Tensor) and g.device == x.device and g.dtype == tdt, k
        assert tuple(g.shape) == rg[k].shape, k
        assert_close("d" + k, to_host(g), rg[k], tol)
    return dev, (y, h_n, c_n), cache, grads


@gpu
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("semantics", list(GPU_SEMANTICS))
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference(cell, semantics, dtype, algo, rng):
    positive = cell == "rnn_relu" and dtype != "float32"  # no kink flips (module docstring)
    problem = make_gpu_problem(cell, 7, 5, 6, 17, rng, positive=positive,
                               **GPU_SEMANTICS[semantics])
    check_gpu(cell, problem, dtype, algo)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("semantics", ["plain", "lengths_unsorted", "reverse_mask",
                                       "batch_first_lengths", "no_state"])
@pytest.mark.parametrize("P", [5, 24])
def test_projection_matches_reference(P, semantics, dtype, rng):
    """LSTM with projection (P smaller and larger than H = 17): the standard algorithm,
    which auto picks, and the persistent kernels (W_hr's rows split among the blocks
    forward, its columns backward)."""
    problem = make_gpu_problem("lstm", 7, 5, 6, 17, rng, proj=P, **GPU_SEMANTICS[semantics])
    _, _, cache, grads = check_gpu("lstm", problem, dtype, "auto")
    assert cache.algo == "standard" and tuple(grads["w_hr"].shape) == (P, 17)
    check_gpu("lstm", problem, dtype, "persistent")


@gpu
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell,P", [("lstm", 0), ("gru", 0), ("rnn_tanh", 0), ("lstm", 5)],
                         ids=["lstm", "gru", "rnn_tanh", "lstm_projection"])
def test_checkpoint_matches_reference_and_full_cache(cell, P, dtype, algo, rng):
    """checkpoint=k on the device, with either algorithm: a smaller cache, results
    within the bounds of the reference, and (float32) within 1e-5 of the full cache's
    (cuBLAS may sum a segment's input projection in another order than the whole
    one's)."""
    for semantics, k in (("plain", True), ("lengths_unsorted", 2), ("reverse_mask", 3),
                         ("batch_first_lengths", 7), ("no_state", 1)):
        problem = make_gpu_problem(cell, 7, 5, 6, 17, rng, proj=P, **GPU_SEMANTICS[semantics])
        _, full_out, full_cache, full_g = check_gpu(cell, problem, dtype, algo)
        args, kw, dy, dh_n, dc_n = problem
        problem = (args, {**kw, "checkpoint": k}, dy, dh_n, dc_n)
        _, out, cache, g = check_gpu(cell, problem, dtype, algo)
        assert cache.checkpoint == (3 if k is True else k) and cache.algo == algo
        assert cache.nbytes < full_cache.nbytes
        if dtype == "float32":
            for a, b in list(zip(out, full_out)) + [(g[n], full_g[n]) for n in GRAD_KEYS]:
                if b is not None:
                    assert rel_err(to_host(a), to_host(b)) <= 1e-5


@gpu
def test_projection_moderate_shape(rng):
    """T=20, B=8, H=256, P=128 (torch.nn's proj_size < hidden_size), unsorted lengths."""
    problem = make_gpu_problem("lstm", 20, 8, 64, 256, rng, lengths="unsorted", proj=128)
    for algo in ALGOS:
        check_gpu("lstm", problem, "float32", algo)
        check_gpu("lstm", problem, "bfloat16", algo)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("algo", ALGOS)
def test_relu_half_forward(algo, dtype, rng):
    """rnn_relu with inputs of both signs in half precision: the forward (continuous) within
    the bound; gradients only in the all-positive problems (module docstring)."""
    for semantics in ("plain", "lengths_unsorted", "mask"):
        problem = make_gpu_problem("rnn_relu", 7, 5, 6, 17, rng, **GPU_SEMANTICS[semantics])
        check_gpu("rnn_relu", problem, dtype, algo, forward_only=True)


@gpu
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cell", CELLS)
def test_moderate_shape(cell, algo, rng):
    """T=20, B=8, H=256: many blocks in the persistent kernel's grid-wide barrier, and a
    W_hh slice per block; float32 and bfloat16, unsorted lengths in reverse."""
    problem = make_gpu_problem(cell, 20, 8, 64, 256, rng, lengths="unsorted", reverse=True,
                               positive=False)
    check_gpu(cell, problem, "float32", algo)
    if cell != "rnn_relu":
        check_gpu(cell, problem, "bfloat16", algo)


def _cluster_mode_or_skip(monkeypatch, cell, dtype, B, H):
    """Ask for the persistent kernels' cluster mode; skip where the device has none."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER", "1")
    lays = [_device._cuda.persistent_layout(cell, dtype, B, H, bwd, 0) for bwd in (False, True)]
    if not all(lay["cluster"] for lay in lays):
        pytest.skip(f"no cluster mode here (compute capability 9 or more): {lays}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("semantics", ["plain", "reverse_lengths", "batch_first_mask", "no_state"])
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_cluster_mode_matches_reference(cell, semantics, dtype, monkeypatch, rng):
    """FUSEDRNN_CUDA_PERSISTENT_CLUSTER=1: the persistent kernels as one thread-block
    cluster exchanging each step's vectors through distributed shared memory."""
    _cluster_mode_or_skip(monkeypatch, cell, dtype, 5, 17)
    positive = cell == "rnn_relu" and dtype != "float32"
    problem = make_gpu_problem(cell, 7, 5, 6, 17, rng, positive=positive,
                               **GPU_SEMANTICS[semantics])
    check_gpu(cell, problem, dtype, "persistent")


@gpu
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_persistent_cluster_mode_moderate_shape(cell, monkeypatch, rng):
    """T = 20, B = 8, H = 256 in one cluster of 8 blocks (32 units each), float32 and
    bfloat16, and a checkpointed cache against the full one."""
    _cluster_mode_or_skip(monkeypatch, cell, "float32", 8, 256)
    problem = make_gpu_problem(cell, 20, 8, 64, 256, rng, lengths="unsorted", reverse=True)
    dev, _, _, grads = check_gpu(cell, problem, "float32", "persistent")
    check_gpu(cell, problem, "bfloat16", "persistent")
    args, kw, dy, *_ = problem
    *_, cache = _device.forward(cell, *dev, **kw, algo="persistent", checkpoint=3)
    g = _device.backward(cache, to_dev(dy, "float32"), to_dev(problem[3], "float32"),
                         to_dev(problem[4], "float32"))
    for k in GRAD_KEYS:
        if grads[k] is not None:
            assert rel_err(to_host(g[k]), to_host(grads[k])) <= 1e-5, k


@gpu
def test_persistent_cluster_of_16_matches_reference(monkeypatch, rng):
    """LSTM H = 384 float32 at B = 1: 8 blocks cannot hold W_hh (2.4 MB), a cluster
    of 16 can (or, where the device cannot make it resident, grid mode runs)."""
    _cluster_mode_or_skip(monkeypatch, "lstm", "float32", 1, 384)
    lay = _device._cuda.persistent_layout("lstm", "float32", 1, 384, False, 0)
    assert lay["cluster"] == 16, lay
    problem = make_gpu_problem("lstm", 10, 1, 32, 384, rng, reverse=True)
    check_gpu("lstm", problem, "float32", "persistent")


@gpu
@pytest.mark.parametrize("cell", CELLS)
def test_auto_algorithm(cell, rng):
    problem = make_gpu_problem(cell, 6, 4, 5, 24, rng, lengths="unsorted")
    *_, cache, _ = check_gpu(cell, problem, "float32", "auto")
    assert cache.algo == _device._cuda.choose_algo(cell, "float32", 6, 4, 5, 24, 0)
    assert cache.algo in ALGOS


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_benchmark_mode(cell, dtype, rng):
    """algo 'benchmark' (FUSEDRNN_CUDA_ALGO=benchmark): the first call times both
    algorithms on the device, forward and backward apart, and keeps the faster; its
    results are the reference's, and a second call's are bitwise the first's."""
    cuda = _device._cuda
    cuda.benchmark_clear()
    try:
        problem = make_gpu_problem(cell, 20, 8, 64, 256, rng, lengths="unsorted")
        dev, out, cache, grads = check_gpu(cell, problem, dtype, "benchmark")
        table = {e["pass"]: e for e in cuda.benchmark_table()}
        assert set(table) == {"forward+cache", "backward"}, table
        for e in table.values():
            assert e["ms_standard"] > 0 and e["ms_persistent"] > 0, e
            times = {"standard": e["ms_standard"], "persistent": e["ms_persistent"]}
            if e["ms_cluster"] >= 0:  # (sm_90: cluster mode fits B = 8, H = 256 in float32)
                times["cluster"] = e["ms_cluster"]
            fastest = min(times, key=times.get)
            assert ("cluster" if e["cluster"] else e["algo"]) == fastest, e
        assert cache.algo == table["forward+cache"]["algo"]
        _, out2, _, grads2 = check_gpu(cell, problem, dtype, "benchmark")
        assert {e["pass"]: e for e in cuda.benchmark_table()} == table  # not timed again
        for a, b in zip(out, out2):
            assert a is None or torch.equal(a, b)
        for k in GRAD_KEYS:
            assert grads[k] is None or torch.equal(grads[k], grads2[k]), k
    finally:
        cuda.benchmark_clear()


@gpu
@pytest.mark.parametrize("algo", ["standard", "persistent"])
def test_algorithm_from_the_environment(algo, monkeypatch, rng):
    """fusedrnn.forward (the public entry point) on torch tensors honours FUSEDRNN_CUDA_ALGO."""
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", algo)
    args, kw, dy, dh_n, dc_n = make_gpu_problem("gru", 5, 3, 4, 8, rng)
    dev = [to_dev(a, "float32") for a in args]
    y, h_n, c_n, cache = fusedrnn.forward("gru", *dev, **kw)
    assert cache.algo == algo and c_n is None
    g = fusedrnn.backward(cache, to_dev(dy, "float32"))
    ry, rh, _, rcache = reference.forward("gru", *[to_host(a) for a in dev], **kw)
    assert_close("y", to_host(y), ry, TOL["float32"])
    rg = reference.backward(rcache, to_host(to_dev(dy, "float32")))
    assert_close("dw_hh", to_host(g["w_hh"]), rg["w_hh"], TOL["float32"])
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", "fastest")
    with pytest.raises(ValueError, match="FUSEDRNN_CUDA_ALGO"):
        fusedrnn.forward("gru", *dev, **kw)


@gpu
@pytest.mark.parametrize("algo", ["auto", "standard", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_zero_sizes(cell, algo, rng):
    """T = 0 and B = 0 just work (DESIGN.md section 4), whatever algorithm is asked for."""
    for T, B in ((0, 3), (4, 0), (0, 0)):
        for no_state in (False, True):
            problem = make_gpu_problem(cell, T, B, 3, 5, rng, no_state=no_state)
            dev, (y, h_n, c_n), cache, g = check_gpu(cell, problem, "float32", algo)
            assert tuple(y.shape) == (T, B, 5) and tuple(g["x"].shape) == (T, B, 3)
            for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
                assert not g[k].any()
            if T == 0 and B and not no_state:  # nothing ran: the state passes through
                assert torch.equal(h_n, dev[5])
                assert torch.equal(g["h0"], to_dev(problem[3], "float32"))
                if cell == "lstm":
                    assert torch.equal(c_n, dev[6])


@gpu
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cell", CELLS)
def test_repeated_backward_and_determinism(cell, algo, rng):
    args, kw, dy, dh_n, dc_n = make_gpu_problem(cell, 7, 5, 6, 17, rng, lengths="unsorted")
    dev = [to_dev(a, "float32") for a in args]
    ddy, ddh, ddc = (to_dev(a, "float32") for a in (dy, dh_n, dc_n))
    y, h_n, _, cache = _forward_or_skip(cell, dev, kw, algo)
    g1 = _device.backward(cache, ddy, ddh, ddc)
    g2 = _device.backward(cache, ddy, ddh, ddc)
    y2, h_n2, _, cache2 = _device.forward(cell, *dev, **kw, algo=algo)
    for a in dev:  # the cache holds its own copies of x and the weights
        if a is not None:
            a.fill_(7.0)
    g3 = _device.backward(cache, ddy, ddh, ddc)
    g4 = _device.backward(cache2, ddy, ddh, ddc)
    torch.cuda.synchronize()
    assert torch.equal(y, y2) and torch.equal(h_n, h_n2)
    for k in GRAD_KEYS:
        if g1[k] is not None:
            for other in (g2, g3, g4):
                assert torch.equal(g1[k], other[k]), k


@gpu
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_inference_matches_training(cell, algo, rng):
    args, kw, *_ = make_gpu_problem(cell, 7, 5, 6, 17, rng, mask=True)
    dev = [to_dev(a, "float32") for a in args]
    y, h_n, c_n, cache = _forward_or_skip(cell, dev, kw, algo)
    y2, h_n2, c_n2, cache2 = _device.forward(cell, *dev, **kw, algo=algo, training=False)
    assert cache2 is None and cache is not None
    assert_close("y", to_host(y2), to_host(y), 1e-6)
    assert_close("h_n", to_host(h_n2), to_host(h_n), 1e-6)
    if c_n is not None:
        assert_close("c_n", to_host(c_n2), to_host(c_n), 1e-6)


@gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_runs_on_the_current_stream(algo, monkeypatch, rng):
    """Inside ``torch.cuda.stream(s)`` both calls get s, and the results (read after
    synchronizing s) match the reference."""
    seen = []
    real_forward, real_backward = _device._cuda.forward, _device._cuda.backward

    def forward(*a, **k):  # (cell, dtype, T, B, I, H, reverse, batch_first, device, stream, ...)
        seen.append(("forward", k["stream"] if "stream" in k else a[9]))
        return real_forward(*a, **k)

    def backward(*a, **k):  # (cache, stream, ...)
        seen.append(("backward", k["stream"] if "stream" in k else a[1]))
        return real_backward(*a, **k)

    monkeypatch.setattr(_device._cuda, "forward", forward)
    monkeypatch.setattr(_device._cuda, "backward", backward)
    problem = make_gpu_problem("lstm", 7, 5, 6, 17, rng, lengths="unsorted")
    args, kw, dy, dh_n, dc_n = problem
    dev = [to_dev(a, "float32") for a in args]
    ddy = to_dev(dy, "float32")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert torch.cuda.current_stream().cuda_stream == s.cuda_stream
        y, h_n, c_n, cache = _forward_or_skip("lstm", dev, kw, algo)
        g = fusedrnn.backward(cache, ddy)
    s.synchronize()
    assert seen == [("forward", s.cuda_stream), ("backward", s.cuda_stream)]
    assert s.cuda_stream != torch.cuda.default_stream().cuda_stream
    ry, rh, rc, rcache = reference.forward("lstm", *[to_host(a) for a in dev], **kw)
    rg = reference.backward(rcache, to_host(ddy))
    for name, a, r in (("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc), ("dx", g["x"], rg["x"]),
                       ("dw_hh", g["w_hh"], rg["w_hh"]), ("db_ih", g["b_ih"], rg["b_ih"])):
        assert isinstance(a, torch.Tensor) and a.is_cuda
        assert_close(name, to_host(a), r, TOL["float32"])


@gpu
def test_lengths_and_mask_as_device_tensors(rng):
    for sem in ("lengths_unsorted", "batch_first_mask"):
        args, kw, dy, dh_n, dc_n = make_gpu_problem("gru", 6, 4, 3, 8, rng, **GPU_SEMANTICS[sem])
        dev = [to_dev(a, "float32") for a in args]
        y1, h1, _, _ = _device.forward("gru", *dev, **kw, training=False)
        kw2 = dict(kw)
        for key in ("lengths", "mask"):
            if key in kw2:
                kw2[key] = torch.from_numpy(np.asarray(kw2[key])).cuda()
        y2, h2, _, _ = _device.forward("gru", *dev, **kw2, training=False)
        assert torch.equal(y1, y2) and torch.equal(h1, h2)


@gpu
def test_non_contiguous_tensors(rng):
    args, kw, dy, dh_n, dc_n = make_gpu_problem("lstm", 5, 3, 4, 8, rng)
    dev = [to_dev(a, "float32") for a in args]
    nc = [None if a is None else (a.t().contiguous().t() if a.dim() == 2 else a) for a in dev]
    nc[0] = dev[0].transpose(0, 1).contiguous().transpose(0, 1)  # x: [T, B, I] view, strided
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    y1, h1, c1, _ = _device.forward("lstm", *dev, **kw, training=False)
    y2, h2, c2, _ = _device.forward("lstm", *nc, **kw, training=False)
    assert torch.equal(y1, y2) and torch.equal(h1, h2) and torch.equal(c1, c2)


@gpu
def test_errors_with_real_tensors(rng):
    args, kw, dy, *_ = make_gpu_problem("gru", 4, 2, 3, 5, rng)
    dev = [to_dev(a, "float32") for a in args]
    bad = list(dev)
    bad[1] = bad[1].cpu()
    with pytest.raises(TypeError, match="w_ih"):
        fusedrnn.forward("gru", *bad, **kw)
    with pytest.raises(TypeError, match="x must have dtype"):
        fusedrnn.forward("gru", *[None if a is None else a.double() for a in dev], **kw)
    *_, cache = fusedrnn.forward("gru", *dev, **kw)
    with pytest.raises(ValueError, match="dy must have shape"):
        fusedrnn.backward(cache, to_dev(dy, "float32")[:, :1])
    with pytest.raises(TypeError, match="dy is a host array"):
        fusedrnn.backward(cache, dy)


@gpu
def test_device_array_round_trip():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 5)).astype(np.float32)
    for dtype in DTYPES:
        d = fusedrnn.DeviceArray.from_host(a, dtype=dtype)
        back = d.get()
        want = torch.from_numpy(a).to(TORCH_DTYPE[dtype]).float().numpy()
        np.testing.assert_array_equal(back.astype(np.float32), want)
        assert d.__cuda_array_interface__["data"][0] == d.ptr != 0
        assert _device._cuda.pointer_device(d.ptr) == 0
    z = fusedrnn.DeviceArray.from_host(np.zeros((0, 3), np.float32))
    assert z.get().shape == (0, 3)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("algo", ALGOS)
def test_device_array_inputs(dtype, algo, rng):
    """Arrays that come only through __cuda_array_interface__ (fusedrnn's own DeviceArray):
    outputs and gradients are DeviceArrays, the values match the reference."""
    args, kw, dy, dh_n, dc_n = make_gpu_problem("lstm", 6, 4, 5, 9, rng, mask=True)
    dev = [None if a is None else fusedrnn.DeviceArray.from_host(a, dtype=dtype) for a in args]
    rounded = [None if a is None else a.get().astype(np.float64) for a in dev]
    ddy = fusedrnn.DeviceArray.from_host(dy, dtype=dtype)
    y, h_n, c_n, cache = _forward_or_skip("lstm", dev, kw, algo)
    g = fusedrnn.backward(cache, ddy)
    ry, rh, rc, rcache = reference.forward("lstm", *rounded, **kw)
    rg = reference.backward(rcache, ddy.get().astype(np.float64))
    for name, a, r in (("y", y, ry), ("h_n", h_n, rh), ("c_n", c_n, rc)):
        assert isinstance(a, fusedrnn.DeviceArray) and a.dtype == dtype
        assert_close(name, a.get(), r, TOL[dtype])
    for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"):
        assert isinstance(g[k], fusedrnn.DeviceArray) and g[k].shape == rg[k].shape
        assert_close("d" + k, g[k].get(), rg[k], TOL[dtype])


@gpu
def test_cupy_arrays(rng):
    cupy = pytest.importorskip("cupy")
    args, kw, dy, dh_n, dc_n = make_gpu_problem("gru", 6, 4, 5, 9, rng, lengths="unsorted")
    dev = [None if a is None else cupy.asarray(a.astype(np.float32)) for a in args]
    y, h_n, c_n, cache = fusedrnn.forward("gru", *dev, **kw)
    g = fusedrnn.backward(cache, cupy.asarray(dy.astype(np.float32)))
    assert isinstance(y, cupy.ndarray) and isinstance(g["w_hh"], cupy.ndarray)
    rounded = [None if a is None else cupy.asnumpy(a).astype(np.float64) for a in dev]
    ry, rh, _, rcache = reference.forward("gru", *rounded, **kw)
    rg = reference.backward(rcache, dy.astype(np.float32).astype(np.float64))
    assert_close("y", cupy.asnumpy(y), ry, TOL["float32"])
    assert_close("h_n", cupy.asnumpy(h_n), rh, TOL["float32"])
    for k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"):
        assert_close("d" + k, cupy.asnumpy(g[k]), rg[k], TOL["float32"])


@gpu
def test_gpu_bench_quick(tmp_path, capsys):
    import csv

    from fusedrnn.__main__ import main
    from fusedrnn import _bench_cuda

    rc = main(["bench", "--device", "cuda", "--shapes", "10,2,32", "--cells", "gru",
               "--repeats", "1", "--min-sample-ms", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert "allow_tf32 = False" in out and torch.cuda.get_device_name() in out
    (path,) = tmp_path.glob("cuda-*.csv")
    assert path.with_suffix(".txt").exists()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _bench_cuda.CSV_COLUMNS
        rows = list(reader)
    assert {r["provider"] for r in rows} <= set(_bench_cuda.PROVIDERS)
    assert {"fusedrnn", "fusedrnn.standard", "torch"} <= {r["provider"] for r in rows}
    for r in rows:
        assert r["check"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["gflops"]) > 0

"""CUDA device arrays for ``fusedrnn.forward`` / ``backward`` (the optional CUDA backend).

``fusedrnn.forward`` sends a call here when x lives on a CUDA device. Arrays
come in zero-copy from

- PyTorch CUDA tensors (read through their own attributes; torch is never
  imported here unless the caller passed a torch tensor, so it is already
  imported),
- anything with ``__cuda_array_interface__`` (CuPy, Numba, JAX, ...),

and the results are allocated on the same device with the caller's own
library (``torch.empty``, ``cupy.empty``), or, for other producers, as a
:class:`DeviceArray` (fusedrnn-owned memory that exposes
``__cuda_array_interface__``). Kernels run on the caller's stream: torch's or
CuPy's current stream, or the stream named by the interface.

Shape legend: T steps, B batch, I input size, H hidden size, G gates.
Supported dtypes on a device: float32, float16 and bfloat16 (bfloat16 through
torch); arithmetic is float32 (docs/cuda.md gives the tolerances).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import numpy as np

from . import _validate

try:  # the optional extension: absent from CPU-only builds
    from . import _cuda
except ImportError as _e:  # pragma: no cover - depends on the build
    _cuda = None
    _CUDA_IMPORT_ERROR = str(_e)
else:
    _CUDA_IMPORT_ERROR = ""

DTYPES = ("float32", "float16", "bfloat16")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "int64": 8,
             "bool": 1, "uint8": 1, "int8": 1, "int16": 2}
_TYPESTR = {"<f4": "float32", "<f2": "float16", "<f8": "float64", "|b1": "bool", "<i4": "int32",
            "<i8": "int64", "|u1": "uint8", "|i1": "int8", "<i2": "int16"}
_TYPESTR_OUT = {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2"}


_available = None


def available() -> bool:
    """Whether the CUDA extension is built and a CUDA device is usable
    (asked once per process: the answer does not change)."""
    global _available
    if _available is None or _available[0] is not _cuda:
        _available = (_cuda, _cuda is not None and _cuda.device_count() > 0)
    return _available[1]


def status() -> str:
    """One line on the CUDA backend: built or not, and the devices it sees."""
    if _cuda is None:
        return "fusedrnn was built without its CUDA extension" + (
            f" ({_CUDA_IMPORT_ERROR})" if _CUDA_IMPORT_ERROR else "")
    return f"CUDA extension built (runtime {_cuda.runtime_version()}); {_cuda.device_status()}"


def _require_cuda():
    if _cuda is None:
        raise RuntimeError(
            "x is a CUDA array, but this fusedrnn was built without its CUDA extension "
            "(build with a CUDA compiler on PATH, or FUSEDRNN_CUDA=ON to require it)")
    if _cuda.device_count() == 0:
        raise RuntimeError(f"x is a CUDA array, but no CUDA device is usable: {_cuda.device_status()}")
    if not _cuda.cublas_path():
        _cuda.load_cublas(_cublas_dir())


def _cublas_dir() -> str:
    """The lib folder of the nvidia-cublas wheel, when it is installed ('' otherwise)."""
    import importlib.util
    for name in ("nvidia.cu13", "nvidia.cublas"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                lib = os.path.join(root, "lib")
                if os.path.isdir(lib) and any(f.startswith("libcublas.so") for f in os.listdir(lib)):
                    return lib
    return ""


# --------------------------------------------------------------------------
# Array views
# --------------------------------------------------------------------------

class View(NamedTuple):
    """A device array seen as a pointer: what the kernels need, and its origin."""
    obj: object
    ptr: int
    shape: tuple
    strides: Optional[tuple]  # in elements; None: C-contiguous
    dtype: str
    device: int
    kind: str  # "torch", "cupy", "jax" or "cai"
    stream: Optional[int]  # the producer's stream, when it names one
    keep: object = None  # what keeps a DLPack import alive


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


def is_device_array(a) -> bool:
    """True for arrays in CUDA device memory (never true for NumPy arrays)."""
    if type(a) is np.ndarray or a is None or isinstance(a, (int, float, list, tuple)):
        return False
    if _is_torch(a):
        return bool(getattr(a, "is_cuda", False))
    try:
        if hasattr(a, "__cuda_array_interface__"):
            return True
    except Exception:  # a property that raises means "not on a device"
        pass
    get_device = getattr(a, "__dlpack_device__", None)
    if get_device is None:
        return False
    try:
        return get_device()[0] in (2, 13)  # kDLCUDA, kDLCUDAManaged
    except Exception:
        return False


def view(name: str, a) -> View:
    """The pointer, shape, dtype and device of a device array (no copy)."""
    if type(a) is DeviceArray:  # our own: dtype known (bfloat16 included)
        return View(a, a.ptr, a.shape, None, a.dtype, a.device, "cai", a._stream or None)
    if _is_torch(a):
        if not a.is_cuda:
            raise TypeError(f"{name} is a CPU tensor but x is on a CUDA device; "
                            f"all arrays of one call must be on x's device")
        dtype = str(a.dtype).replace("torch.", "")
        strides = tuple(a.stride())
        return View(a, a.data_ptr(), tuple(a.shape), strides, dtype, a.device.index, "torch", None)
    mod = type(a).__module__
    kind = "cupy" if mod.startswith("cupy") else "jax" if mod.startswith(("jax", "jaxlib")) else "cai"
    cai = None
    if kind != "jax":  # JAX through DLPack, whose stream argument orders the hand-over
        try:
            cai = a.__cuda_array_interface__
        except AttributeError:
            cai = None
    if cai is None or cai.get("typestr") not in _TYPESTR:
        dl = _dlpack_view(name, a, kind)
        if dl is not None:
            return dl
    if cai is None:
        raise TypeError(f"{name} must be an array on x's CUDA device (a torch CUDA tensor, or an "
                        f"object with __cuda_array_interface__ or DLPack), got {type(a).__name__}")
    typestr = cai["typestr"]
    dtype = _TYPESTR.get(typestr)
    if dtype is None:
        raise TypeError(f"{name} has an unsupported element type {typestr!r} "
                        f"(float32, float16; bfloat16 through torch)")
    shape = tuple(int(s) for s in cai["shape"])
    strides = cai.get("strides")
    if strides is not None:
        size = _ITEMSIZE[dtype]
        if any(s % size for s in strides):
            raise ValueError(f"{name} has strides {tuple(strides)} that are not a multiple of its "
                             f"element size {size}")
        strides = tuple(int(s) // size for s in strides)
    ptr = int(cai["data"][0] or 0)
    dev = _cuda.pointer_device(ptr) if (ptr and _cuda is not None) else -1
    if dev < 0 and kind == "cupy":
        dev = a.device.id
    return View(a, ptr, shape, strides, dtype, dev, kind, cai.get("stream"))


#: DLPack's name for the legacy default stream, where calls on arrays that
#: name no stream of their own run
_LEGACY_STREAM = 1


def _dlpack_view(name, a, kind):
    """The view of a DLPack producer's CUDA array, or None when a is not one."""
    get_device = getattr(a, "__dlpack_device__", None)
    if get_device is None or _cuda is None:
        return None
    dev_type, dev_id = get_device()
    if dev_type not in (2, 13):  # kDLCUDA, kDLCUDAManaged
        return None
    dl = _cuda.from_dlpack_capsule(a.__dlpack__(stream=_LEGACY_STREAM))
    if dl.dtype not in _ITEMSIZE:
        raise TypeError(f"{name} has an unsupported element type {dl.dtype}")
    return View(a, dl.ptr, dl.shape, dl.strides, dl.dtype, dl.device_id, kind, _LEGACY_STREAM, dl)


def _c_strides(shape):
    s, out = 1, []
    for d in reversed(shape):
        out.append(s)
        s *= max(d, 1)
    return tuple(reversed(out))


def _contiguous(name: str, v: View) -> View:
    """v itself when C-contiguous, else a contiguous copy made by its own library."""
    if v.strides is None or math.prod(v.shape) == 0:
        return v
    want = _c_strides(v.shape)
    if all(s == w or d == 1 for s, w, d in zip(v.strides, want, v.shape)):
        return v
    if v.kind == "torch":
        return view(name, v.obj.contiguous())
    if v.kind == "cupy":
        import cupy
        return view(name, cupy.ascontiguousarray(v.obj))
    raise ValueError(f"{name} must be C-contiguous on a CUDA device (strides {v.strides} for "
                     f"shape {v.shape}); make a contiguous copy first")


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------

class DeviceArray:
    """A CUDA array that fusedrnn allocated, for callers whose arrays come
    through ``__cuda_array_interface__`` without an allocating library.

    Exposes ``__cuda_array_interface__`` (CuPy, Numba and others wrap it
    zero-copy), DLPack (``__dlpack__``: ``torch.from_dlpack``,
    ``jax.dlpack.from_dlpack``) and ``get()`` (a NumPy copy; bfloat16 comes
    back as float32).
    """

    def __init__(self, shape, dtype: str, device: int, stream: int = 0):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.device = device
        self._stream = stream
        self.nbytes = math.prod(self.shape) * _ITEMSIZE[dtype]
        self._buf = _cuda.DeviceBuffer(self.nbytes, device, stream)

    @property
    def ptr(self) -> int:
        return self._buf.ptr

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": _TYPESTR_OUT[self.dtype], "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": self._stream or None}

    def __dlpack__(self, stream=None, **kwargs):
        if stream is not None and stream != self._stream:
            _cuda.stream_synchronize(self._stream)  # written on our stream, read on theirs
        return _cuda.to_dlpack(self._buf, list(self.shape), self.dtype)

    def __dlpack_device__(self):
        return (2, self.device)  # kDLCUDA

    @classmethod
    def from_host(cls, a, device: int = 0, dtype: Optional[str] = None, stream: int = 0):
        """Copy a NumPy array to a device (dtype: float32, float16 or bfloat16)."""
        a = np.asarray(a)
        dtype = dtype or str(a.dtype)
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {DTYPES} on a CUDA device, got {dtype} "
                            f"(pass dtype='float32' to convert)")
        if dtype == "bfloat16":
            bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
            # round to nearest even, as the hardware conversion does (finite values)
            host = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            host = np.ascontiguousarray(a, dtype)
        out = cls(a.shape, dtype, device, stream)
        _cuda.memcpy_from_host(out.ptr, host.reshape(-1).view(np.uint8), stream)
        return out

    def get(self) -> np.ndarray:
        raw = np.frombuffer(_cuda.memcpy_to_host(self.ptr, self.nbytes, self._stream), np.uint8)
        if self.dtype == "bfloat16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        return raw.view(self.dtype).reshape(self.shape).copy()

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device=cuda:{self.device})"


def _stream_of(v: View) -> int:
    if v.kind == "torch":
        import torch
        return torch.cuda.current_stream(v.device).cuda_stream
    if v.kind == "cupy":
        import cupy
        with cupy.cuda.Device(v.device):
            return cupy.cuda.get_current_stream().ptr
    return int(v.stream or 0)


def _allocator(v: View, stream: int):
    """A function (shape) -> (array, pointer) allocating like v's library."""
    if v.kind == "torch":
        import torch
        dt, dev = getattr(torch, v.dtype), torch.device("cuda", v.device)

        def alloc(shape):
            t = torch.empty(shape, dtype=dt, device=dev)
            return t, t.data_ptr()
    elif v.kind == "cupy":
        import cupy
        device, dtype = v.device, v.dtype

        def alloc(shape):
            with cupy.cuda.Device(device):
                a = cupy.empty(shape, dtype=dtype)
            return a, a.data.ptr
    else:
        device, dtype = v.device, v.dtype

        def alloc(shape):
            a = DeviceArray(shape, dtype, device, stream)
            return a, a.ptr
    return alloc


def _to_caller(kind):
    """Turns fusedrnn-allocated results into the caller's array type (JAX)."""
    if kind != "jax":
        return lambda a: a
    import jax.dlpack

    return lambda a: None if a is None else jax.dlpack.from_dlpack(a)


# --------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------

class DeviceCache:
    """What ``backward`` needs from a device ``forward``: fusedrnn-owned
    device memory (copies of x and the weights, every step's state, the saved
    gates), freed when this object is. ``nbytes`` is its size."""

    def __init__(self, core, x: View):
        self._core = core
        self._x = x  # how x came in (kind, device, dtype, stream), without the array
        self.cell, self.dtype, self.T, self.B, self.I, self.H = (
            core.cell, core.dtype, core.T, core.B, core.I, core.H)
        self.P = core.P  # the state's size: the projection size with w_hr, else H
        self.checkpoint = core.checkpoint  # k: the state kept every k steps (0: every step)
        self.batch_first = core.batch_first
        self.device = x.device

    @property
    def nbytes(self) -> int:
        return self._core.nbytes

    @property
    def algo(self) -> str:
        return self._core.algo

    def __repr__(self):
        return (f"DeviceCache(cell={self.cell!r}, dtype={self.dtype}, T={self.T}, B={self.B}, "
                f"I={self.I}, H={self.H}, device=cuda:{self.device}, nbytes={self.nbytes})")


def _algo() -> str:
    a = os.environ.get("FUSEDRNN_CUDA_ALGO", "auto") or "auto"
    if a not in ("auto", "standard", "persistent", "benchmark"):
        raise ValueError("FUSEDRNN_CUDA_ALGO must be auto, standard, persistent or benchmark, "
                         f"got {a!r}")
    return a


def _host_ints(name, a):
    """lengths (host or device) as a host integer array."""
    if a is None:
        return None
    if is_device_array(a):
        if _is_torch(a):
            return a.detach().cpu().numpy()
        v = view(name, a)
        v = _contiguous(name, v)
        raw = _cuda.memcpy_to_host(v.ptr, math.prod(v.shape) * _ITEMSIZE[v.dtype], int(v.stream or 0))
        return np.frombuffer(raw, np.dtype(v.dtype)).reshape(v.shape)
    return np.asarray(a)


def _device_view(name, a, x: View) -> View:
    """The view of argument ``a``, which must be a device array."""
    if not is_device_array(a):
        raise TypeError(f"{name} is a host array ({type(a).__name__}) but x is on CUDA device "
                        f"{x.device}; all arrays of one call must be on x's device")
    return view(name, a)


def _checked(name, v: View, x: View, shape, legend) -> View:
    """v, contiguous, after checking it is on x's device with x's dtype and the given shape."""
    if v.device != x.device and v.device >= 0 and x.device >= 0:
        # (a size-0 array may carry a null pointer, whose device is unknown: -1)
        raise ValueError(f"{name} is on CUDA device {v.device} but x is on CUDA device {x.device}")
    if v.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but x has dtype {x.dtype}; "
                        f"all arrays of one call must share x's dtype")
    if v.shape != tuple(shape):
        legend = legend() if callable(legend) else legend
        raise ValueError(f"{name} must have shape {legend} = {tuple(shape)}, got {v.shape}")
    return _contiguous(name, v)


def _check(name, a, x: View, shape, legend) -> View:
    return _checked(name, _device_view(name, a, x), x, shape, legend)


def _ptr(v: Optional[View]) -> int:
    return 0 if v is None else v.ptr


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            mask=None, reverse=False, batch_first=False, training=True, w_hr=None,
            checkpoint=False, algo=None):
    """``fusedrnn.forward`` for x on a CUDA device (same contract)."""
    G = _validate.gates_of(cell)
    reverse = _validate._flag("reverse", reverse)
    batch_first = _validate._flag("batch_first", batch_first)
    training = _validate._flag("training", training)
    xv = view("x", x)
    if xv.dtype not in DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16 on a CUDA device, "
                        f"got {xv.dtype}")
    if len(xv.shape) != 3:
        layout = "[B, T, I]" if batch_first else "[T, B, I]"
        raise ValueError(f"x must have 3 dimensions {layout}, got shape {xv.shape}")
    xv = _contiguous("x", xv)
    B, T, I = xv.shape if batch_first else (xv.shape[1], xv.shape[0], xv.shape[2])
    if I < 1:
        raise ValueError(f"x must have input size I >= 1 (last dimension), got shape {xv.shape}")
    whh = _device_view("w_hh", w_hh, xv)
    if len(whh.shape) != 2:
        raise ValueError(f"w_hh must have 2 dimensions [G*H, H], got shape {whh.shape}")
    whr = None
    if w_hr is None:
        H = P = whh.shape[1]
        if H < 1:
            raise ValueError(f"w_hh must have hidden size H >= 1 (second dimension), "
                             f"got shape {whh.shape}")
        whh = _checked("w_hh", whh, xv, (G * H, H),
                       lambda: f"[G*H, H] with G={G} for cell {cell!r}")
    else:
        # LSTM with projection: the state h has P values, the cell c has H.
        if cell != "lstm":
            raise ValueError(f"w_hr (projection) is only used by cell 'lstm', got cell {cell!r}")
        whr = _device_view("w_hr", w_hr, xv)
        if len(whr.shape) != 2 or min(whr.shape) < 1:
            raise ValueError(f"w_hr must have shape [P, H] with P, H >= 1, got {whr.shape}")
        P, H = whr.shape
        whr = _checked("w_hr", whr, xv, (P, H), "[P, H]")
        whh = _checked("w_hh", whh, xv, (G * H, P),
                       lambda: f"[4*H, P] with H={H}, P={P} (from w_hr [P, H])")
    GH = G * H
    wih = _check("w_ih", w_ih, xv, (GH, I), lambda: f"[G*H, I] with G={G}, H={H}, I={I}")
    bih = None if b_ih is None else _check("b_ih", b_ih, xv, (GH,), "[G*H]")
    bhh = None if b_hh is None else _check("b_hh", b_hh, xv, (GH,), "[G*H]")
    h0v = None if h0 is None else _check("h0", h0, xv, (B, P),
                                         "[B, P]" if whr is not None else "[B, H]")
    if c0 is not None and cell != "lstm":
        raise ValueError(f"c0 is only used by cell 'lstm', got c0 for cell {cell!r}")
    c0v = None if c0 is None else _check("c0", c0, xv, (B, H), "[B, H]")

    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        lengths = _validate.check_lengths(_host_ints("lengths", lengths), B, T)
        lengths = np.ascontiguousarray(lengths, np.int32)
    if mask is not None:
        mask = _validate.check_mask(_host_ints("mask", mask), B, T, batch_first)
        mask = np.ascontiguousarray(mask).view(np.uint8)
    k = _validate._checkpoint(checkpoint, T)  # (checked whether training or not, as on the CPU)
    k = k if training else 0
    algo = algo or _algo()
    _require_cuda()
    if xv.device < 0:  # a size-0 x has no pointer: its device is the weights'
        xv = xv._replace(device=whh.device if whh.device >= 0 else wih.device)
    if xv.device < 0:
        raise ValueError("x's data is not CUDA device memory")
    stream = _stream_of(xv)
    alloc = _allocator(xv, stream)
    y, yp = alloc((B, T, P) if batch_first else (T, B, P))
    h_n, hp = alloc((B, P))
    c_n, cp = alloc((B, H)) if cell == "lstm" else (None, 0)
    core = _cuda.forward(cell, xv.dtype, T, B, I, H, reverse, batch_first, xv.device, stream,
                         xv.ptr, wih.ptr, whh.ptr, _ptr(bih), _ptr(bhh), _ptr(h0v), _ptr(c0v),
                         lengths, mask,
                         yp, hp, cp, training, algo, _ptr(whr), P, k)
    cache = None
    if training:
        # (the view without its array: the cache must not keep the caller's x alive)
        cache = DeviceCache(core, xv._replace(obj=None, keep=None))
    w = _to_caller(xv.kind)
    return w(y), w(h_n), w(c_n), cache


def backward(cache: DeviceCache, dy, dh_n=None, dc_n=None, need_x=True, need_h0=True,
             need_c0=True):
    """``fusedrnn._backward`` for a cache from a device forward: the gradients of x, h0
    and c0 only where wanted (need_*), else None."""
    xv = cache._x
    T, B, I, H, P = cache.T, cache.B, cache.I, cache.H, cache.P
    G, proj = _validate.GATES[cache.cell], cache._core.proj
    s = "P" if proj else "H"
    yshape, ylegend = (((B, T, P), f"[B, T, {s}]") if cache.batch_first
                       else ((T, B, P), f"[T, B, {s}]"))
    dyv = None if dy is None else _check("dy", dy, xv, yshape, ylegend)
    dhv = None if dh_n is None else _check("dh_n", dh_n, xv, (B, P), f"[B, {s}]")
    if dc_n is not None and cache.cell != "lstm":
        raise ValueError(f"dc_n is only used by cell 'lstm', got dc_n for cell {cache.cell!r}")
    dcv = None if dc_n is None else _check("dc_n", dc_n, xv, (B, H), "[B, H]")
    stream = _stream_of(dyv if dyv is not None else xv)
    alloc = _allocator(xv, stream)
    dx, dxp = alloc((B, T, I) if cache.batch_first else (T, B, I)) if need_x else (None, 0)
    dh0, dh0p = alloc((B, P)) if need_h0 else (None, 0)
    dc0, dc0p = alloc((B, H)) if cache.cell == "lstm" and need_c0 else (None, 0)
    dw_ih, a = alloc((G * H, I))
    dw_hh, b = alloc((G * H, P))
    db_ih, c = alloc((G * H,))
    db_hh, d = alloc((G * H,))
    dw_hr, e = alloc((P, H)) if proj else (None, 0)
    _cuda.backward(cache._core, stream, _ptr(dyv), _ptr(dhv), _ptr(dcv), dxp, dh0p, dc0p, a, b, c,
                   d, e)
    w = _to_caller(xv.kind)
    return {"x": w(dx), "h0": w(dh0), "c0": w(dc0), "w_ih": w(dw_ih), "w_hh": w(dw_hh),
            "b_ih": w(db_ih), "b_hh": w(db_hh), "w_hr": w(dw_hr)}

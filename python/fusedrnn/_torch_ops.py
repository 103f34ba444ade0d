"""fusedrnn's kernels as PyTorch custom operators (``torch.library``): glue, no math.

Imported by ``fusedrnn.torch`` (never by ``import fusedrnn``). Two operators run one
recurrent layer in one direction over a whole sequence:

    torch.ops.fusedrnn.layer_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths,
                                     cell, reverse, batch_first, training, checkpoint=0)
        -> (y, h_n, c_n, handle)
    torch.ops.fusedrnn.layer_backward(handle, dy, dh_n, dc_n, cell, batch_first, x_size,
                                      w_ih_size, w_hh_size, w_hr_size, dtype, device)
        -> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)

Shape legend (shared/DESIGN.md section 2): T steps, B batch, I input size, H hidden
size, G gates, P projection size (H when there is no projection). x [T, B, I] (or
[B, T, I] with batch_first), w_ih [G*H, I], w_hh [G*H, P], b_ih, b_hh [G*H],
h0 [B, P], c0 [B, H], w_hr [P, H], lengths int64 [B]; y [T, B, P] (or [B, T, P]),
h_n [B, P], c_n [B, H] for lstm and an empty [0] tensor for the other cells.

How backward finds what forward kept
------------------------------------
``fusedrnn.forward`` returns an opaque ``Cache``; custom ops may only return tensors.
``layer_forward`` therefore returns a *handle*: a one-element int64 tensor whose
storage is a NumPy array (``_CacheHolder``) that owns the cache. The cache lives
exactly as long as the handle's storage (autograd or AOTAutograd keep it as a saved
tensor); ``layer_backward`` finds the cache from the handle's data pointer in a
registry of weak references, which the holder removes itself from when freed. The
handle's *value* is always 0, so outputs of two identical calls compare equal. A
copied handle (a different storage) is not found and raises a clear error instead of
computing anything wrong. Forward runs once; backward never recomputes it.

The autograd formula (``register_autograd``) calls ``layer_backward``, so eager
autograd and ``torch.compile`` (which traces the formula into its backward graph)
take the same path. In plain eager mode (``_plain_eager``) ``run_layer`` skips the
operator dispatch: the implementation runs directly, or, when training, inside
``_EagerLayer``, an autograd.Function that saves the same handle and computes the
same gradients (``_input_grads``) with less glue. A module call that nothing will
differentiate runs all its layers at once on NumPy views (``run_stack_inference``,
when ``direct_inference`` allows it). ``layer_backward`` has
an autograd formula that raises: double backward is not supported. The fake (meta)
implementations only compute shapes.

Projection (LSTM ``proj_size``, argument ``w_hr``) is plumbed through both ops and runs
on the kernels (``fusedrnn.forward(..., w_hr=)``).

Devices
-------
Both ops dispatch by device inside their implementation. CPU tensors go through NumPy
views (``tensor.detach().numpy()`` / ``torch.from_numpy``, no copies) to the C++
kernels. CUDA tensors go to ``fusedrnn.forward`` / ``backward`` as they are: the CUDA
backend reads the torch tensors' pointers (zero-copy), runs on torch's current stream
and allocates its results with ``torch.empty`` on the input's device. Supported dtypes:
float32/float64 on the CPU, float32/float16/bfloat16 on CUDA (``supported_dtypes``).

The handle is a CPU tensor on both devices. Its storage is what owns the cache (a
NumPy holder, as above; a ``DeviceCache`` for CUDA inputs, whose device memory is freed
with it); no kernel ever reads it. A CUDA handle would need a device allocation whose
deleter releases a Python object, for nothing gained. A custom op may return outputs on
two devices; the fake implementation puts the handle on the CPU as well, so a compiled
graph carries it from forward to backward like any saved tensor. Because the handle
says nothing about the device, ``layer_backward`` takes the forward input's ``device``
explicitly: its fake implementation puts the gradients there even when dy, dh_n and
dc_n are all None (its real implementation goes by the cache's type).
"""

from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

import fusedrnn

__all__ = ["layer_forward", "layer_backward", "run_layer", "direct_inference",
           "run_stack_inference", "check_device", "check_dtype", "supported_dtypes"]

#: gates per cell (same table as fusedrnn.CELLS)
GATES = dict(fusedrnn.CELLS)

#: device type -> the dtypes fusedrnn runs there
_DTYPES = {"cpu": (torch.float32, torch.float64),
           "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def supported_dtypes(device) -> Tuple[torch.dtype, ...]:
    """The dtypes fusedrnn runs on ``device`` (a torch.device or a device type string)."""
    return _DTYPES.get(getattr(device, "type", device), ())


def _names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def check_dtype(dtype: torch.dtype, device, who: str = "fusedrnn") -> None:
    """TypeError unless fusedrnn runs ``dtype`` on ``device`` (call check_device first)."""
    ok = supported_dtypes(device)
    if dtype in ok:
        return
    kind = getattr(device, "type", device)
    if kind == "cuda":
        raise TypeError(
            f"{who} runs {_names(ok)} on CUDA devices, got {dtype}: fusedrnn's CUDA "
            f"backend has no {str(dtype).replace('torch.', '')} kernels. Convert the module "
            f"and input (module.float(), or .half()/.bfloat16()), run {dtype} on the CPU, "
            f"or use torch.nn for it")
    raise TypeError(
        f"{who} runs {_names(ok)} weights, got {dtype}; convert the module "
        f"(module.float()) or use torch.nn for {dtype}")


def check_device(t: Tensor, name: str = "input") -> None:
    """Raise a clear error for tensors fusedrnn cannot run: CPU tensors always run; CUDA
    tensors when fusedrnn's CUDA backend is built and sees a device
    (``fusedrnn.cuda_available()``)."""
    if t.is_cpu:  # (a tenth of the time of t.device.type)
        return
    kind = t.device.type
    if kind == "cuda":
        # Under torch.compile the availability query would be a graph break (a call into
        # the extension); the op's real implementation checks again when it runs.
        if torch.compiler.is_compiling() or fusedrnn.cuda_available():
            return
        raise RuntimeError(
            f"fusedrnn: {name} is on {t.device}, but fusedrnn's CUDA backend cannot run it: "
            f"{fusedrnn.cuda_status()}. Fix: install or build fusedrnn with its CUDA "
            f"extension (nvcc on PATH at build time; FUSEDRNN_CUDA=ON makes it required) on "
            f"a machine with a usable CUDA device (fusedrnn.cuda_status() says what it "
            f"sees), or move the module and its inputs to the CPU (module.cpu(), x.cpu()), "
            f"or use torch.nn's RNN/LSTM/GRU (cuDNN) for CUDA tensors.")
    raise RuntimeError(
        f"fusedrnn: {name} is on device {t.device}; fusedrnn runs CPU tensors "
        f"(float32/float64) and CUDA tensors (float32/float16/bfloat16). Move the module "
        f"and its inputs to the CPU or to a CUDA device.")


def _on_cuda(t: Tensor) -> bool:
    """The dispatch rule of both ops: CUDA tensors run on the CUDA backend."""
    return t.is_cuda


def checkpoint_code(checkpoint) -> int:
    """The op's checkpoint argument for a module's ``checkpoint`` attribute: 0 (False),
    -1 (True) or k > 0, or the same error as ``fusedrnn.forward(checkpoint=)``."""
    if checkpoint is True or checkpoint is False:
        return -1 if checkpoint else 0
    return fusedrnn._validate._checkpoint(checkpoint, 1)


# --------------------------------------------------------------------------
# Cache handles
# --------------------------------------------------------------------------

class _CacheHolder(np.ndarray):
    """A one-element int64 array that owns a fusedrnn Cache (``.cache``).

    ``torch.from_numpy(holder)`` gives a tensor whose storage keeps the holder, and so
    the cache, alive.
    """


# data pointer of a live holder -> the holder (an entry goes when its holder is freed)
_registry: "weakref.WeakValueDictionary[int, _CacheHolder]" = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def _make_handle(cache) -> Tensor:
    holder = np.zeros(1, np.int64).view(_CacheHolder)
    holder.cache = cache
    handle = torch.from_numpy(holder)
    with _registry_lock:
        _registry[handle.data_ptr()] = holder
    return handle


def _find_cache(handle: Tensor):
    if handle.numel() == 0:
        raise RuntimeError(
            "fusedrnn: backward through a layer whose forward kept no cache "
            "(layer_forward was called with training=False)")
    with _registry_lock:
        holder = _registry.get(handle.data_ptr())
    if holder is None:
        raise RuntimeError(
            "fusedrnn: the cache of this layer's forward is gone: the handle tensor passed "
            "to layer_backward is not the one layer_forward returned (was it copied?)")
    return holder.cache


def live_caches() -> int:
    """How many forward caches are alive (for tests: they must not leak)."""
    with _registry_lock:
        return len(_registry)


# --------------------------------------------------------------------------
# layer_forward
# --------------------------------------------------------------------------

def _np(t: Optional[Tensor]):
    """A CPU tensor as a NumPy array without copying (None stays None). (force=True
    detaches and, for a CPU tensor of a real dtype, makes the same view as
    t.detach().numpy(), in four fifths of the time)"""
    return None if t is None else t.numpy(force=True)


def _dev(t: Optional[Tensor]):
    """A CUDA tensor as it is, detached (same memory; None stays None)."""
    return None if t is None else t.detach()


def _as_is(a):
    return a


def _from_np(a):
    """A NumPy result as a tensor on the same memory (None stays None)."""
    return None if a is None else torch.from_numpy(a)


def _hidden_sizes(cell: str, w_hh_size, w_hr_size) -> Tuple[object, object]:
    """(H, P): cell hidden size and output size (P = H without projection)."""
    H = w_hh_size[0] // GATES[cell]
    P = w_hr_size[0] if w_hr_size is not None else H
    return H, P


_SHARE = {"share_weights": True}


def _run_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell, reverse, batch_first,
                 training, checkpoint, share_weights=False):
    """fusedrnn.forward on tensors: (y, h_n, c_n or None, cache or None). share_weights
    (CPU): the cache refers to the weights instead of copying them (see _EagerLayer)."""
    check_device(x, "x")
    ck = True if checkpoint == -1 else checkpoint or False
    # the CUDA backend takes torch tensors as they are and returns torch tensors (lengths
    # may be a CPU or a CUDA integer tensor); the CPU backend takes NumPy views
    arg, result = (_dev, _as_is) if _on_cuda(x) else (_np, _from_np)
    run, extra = (fusedrnn._forward, _SHARE) if share_weights else (fusedrnn.forward, {})
    y, h_n, c_n, cache = run(
        cell, arg(x), arg(w_ih), arg(w_hh), arg(b_ih), arg(b_hh), arg(h0), arg(c0),
        lengths=arg(lengths), reverse=reverse, batch_first=batch_first, training=training,
        w_hr=arg(w_hr), checkpoint=ck, **extra)
    return result(y), result(h_n), result(c_n), cache


def _layer_forward(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                   b_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                   w_hr: Optional[Tensor], lengths: Optional[Tensor], cell: str,
                   reverse: bool, batch_first: bool, training: bool,
                   checkpoint: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction: fusedrnn.forward on tensors; returns (y, h_n, c_n, handle).

    checkpoint: 0 keeps the full cache, -1 the state every ceil(sqrt(T)) steps, k > 0
    every k steps (``fusedrnn.forward(..., checkpoint=)``)."""
    y, h_n, c_n, cache = _run_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell,
                                      reverse, batch_first, training, checkpoint)
    c_n = x.new_empty(0) if c_n is None else c_n
    # the handle is a CPU tensor for every device (module docstring: Devices)
    handle = _make_handle(cache) if training else torch.empty(0, dtype=torch.int64)
    return y, h_n, c_n, handle


layer_forward = torch.library.custom_op("fusedrnn::layer_forward", mutates_args=())(
    _layer_forward)


@layer_forward.register_fake
def _layer_forward_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell, reverse,
                        batch_first, training, checkpoint=0):
    if batch_first:
        B, T = x.shape[0], x.shape[1]
    else:
        T, B = x.shape[0], x.shape[1]
    H, P = _hidden_sizes(cell, w_hh.shape, None if w_hr is None else w_hr.shape)
    y = x.new_empty((B, T, P) if batch_first else (T, B, P))
    h_n = x.new_empty((B, P))
    c_n = x.new_empty((B, H)) if cell == "lstm" else x.new_empty(0)
    # the real handle is a CPU tensor whatever x's device (meta stays meta: shapes only)
    handle = x.new_empty(1 if training else 0, dtype=torch.int64, device=_handle_device(x))
    return y, h_n, c_n, handle


def _handle_device(x: Tensor) -> torch.device:
    return x.device if x.device.type == "meta" else torch.device("cpu")


def _forward_setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell, reverse, batch_first, training = \
        inputs[:13]
    ctx.save_for_backward(output[3])
    ctx.training = training
    _keep_for_grads(ctx, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, cell, batch_first)


def _keep_for_grads(ctx, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, cell, batch_first):
    """What _input_grads reads from ctx besides the saved tensors."""
    ctx.cell = cell
    ctx.batch_first = batch_first
    ctx.sizes = (list(x.shape), list(w_ih.shape), list(w_hh.shape),
                 None if w_hr is None else list(w_hr.shape))
    ctx.dtype = x.dtype
    ctx.device = x.device
    ctx.given = (b_ih is not None, b_hh is not None, h0 is not None, c0 is not None,
                 w_hr is not None)
    ctx.set_materialize_grads(False)  # unused outputs -> None -> zeros inside the kernel


def _forward_backward(ctx, dy, dh_n, dc_n, _dhandle):
    if not ctx.training:
        raise RuntimeError("fusedrnn: backward through layer_forward(..., training=False); "
                           "call it with training=True to differentiate it")
    return _input_grads(ctx, dy, dh_n, dc_n) + (None,) * 6  # lengths, cell, flags, checkpoint


def _input_grads(ctx, dy, dh_n, dc_n):
    """The gradients of (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr), None for inputs not
    given, through the cache behind the handle that ctx saved first (and what
    _keep_for_grads put on ctx)."""
    if torch.is_grad_enabled():
        # backward(create_graph=True) in eager mode: the gradients would have to be
        # differentiable, and fusedrnn's are not; refuse rather than return gradients
        # that silently act as constants. (AOTAutograd traces this with grad disabled;
        # a compiled graph refuses double backward itself.)
        _no_double_backward(ctx)
    handle = ctx.saved_tensors[0]  # (unpacking checks the versions of the saved weights)
    dc_n = dc_n if ctx.cell == "lstm" else None
    if _plain_eager((handle, dy, dh_n, dc_n)):  # (see run_layer; and compiled autograd)
        # the gradients of x, h0 and c0 only where autograd wants them: none is
        # computed for a first layer's data or a detached or absent initial state
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _grads(handle, dy, dh_n, dc_n,
                                                                 need[0], need[5], need[6])
    else:
        x_size, w_ih_size, w_hh_size, w_hr_size = ctx.sizes
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = torch.ops.fusedrnn.layer_backward(
            handle, dy, dh_n, dc_n, ctx.cell, ctx.batch_first, x_size, w_ih_size, w_hh_size,
            w_hr_size, ctx.dtype, ctx.device)
    has_b_ih, has_b_hh, has_h0, has_c0, has_w_hr = ctx.given
    return (dx, dw_ih, dw_hh, db_ih if has_b_ih else None, db_hh if has_b_hh else None,
            dh0 if has_h0 else None, dc0 if has_c0 else None, dw_hr if has_w_hr else None)


layer_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


class _EagerLayer(torch.autograd.Function):
    """layer_forward with its autograd formula, for plain eager mode (run_layer), with
    less glue than the operator's: (y, h_n, c_n or None) out, the non-tensor arguments
    in one tuple, no check of the training flag. The handle is saved as for the
    operator (autograd releases it, and so the cache, after a backward without
    retain_graph; torch.utils.checkpoint's recomputed forward saves a new one). On the
    CPU the cache refers to the weights rather than copying them (share_weights; a copy
    of the weights was most of a short sequence's forward), and they are saved for
    backward, whose version check guards them. An RNN(256, 256) training step on one
    token (T = 1, B = 1) took 344 µs this way, 456 µs through the operator's formula
    as it is (torch.nn: 324-347 µs, same process)."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, config):
        cell, reverse, batch_first, checkpoint = config
        shared = not _on_cuda(x)
        y, h_n, c_n, cache = _run_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths,
                                          cell, reverse, batch_first, True, checkpoint, shared)
        # saved: the handle (it owns the cache) and, when the cache reads the
        # weights themselves, those: autograd then refuses a backward after they changed
        # in place (optimizer.step() before backward), as for torch.nn. W_ih only where
        # backward needs it: for dx, or to recompute checkpointed steps (otherwise the
        # gradients do not depend on it, and torch.nn runs too)
        need_ih = shared and (x.requires_grad or checkpoint != 0)
        ctx.save_for_backward(_make_handle(cache), w_hh if shared else None,
                              w_hr if shared else None, w_ih if need_ih else None)
        _keep_for_grads(ctx, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, cell, batch_first)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        return _input_grads(ctx, dy, dh_n, dc_n) + (None, None)  # lengths, config


# --------------------------------------------------------------------------
# layer_backward
# --------------------------------------------------------------------------

def _layer_backward(handle: Tensor, dy: Optional[Tensor], dh_n: Optional[Tensor],
                    dc_n: Optional[Tensor], cell: str, batch_first: bool, x_size: List[int],
                    w_ih_size: List[int], w_hh_size: List[int], w_hr_size: Optional[List[int]],
                    dtype: torch.dtype, device: Optional[torch.device] = None) -> Tuple[
                        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fusedrnn.backward on the cache behind ``handle``; returns
    (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr) in ``dtype`` on the device of the
    forward's x (``device``, which the autograd formula always passes; the fake
    implementation needs it); dc0 and dw_hr are empty [0] tensors when the layer has no
    cell state / no projection.

    The real implementation dispatches by the cache (a device forward's cache holds
    CUDA memory) and does not need ``device``: compiled backward graphs cached on disk by
    an earlier fusedrnn, whose schema had no ``device``, still run (the AOTAutograd cache
    key does not cover a custom op's autograd formula)."""
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _grads(handle, dy, dh_n, dc_n)
    empty = torch.empty(0, dtype=dtype, device=dx.device)
    return (dx, dh0, empty if dc0 is None else dc0, dw_ih, dw_hh, db_ih, db_hh,
            empty.clone() if dw_hr is None else dw_hr)


def _grads(handle: Tensor, dy, dh_n, dc_n, need_x=True, need_h0=True, need_c0=True):
    """fusedrnn.backward on the cache behind ``handle``, as tensors: (dx, dh0, dc0, dw_ih,
    dw_hh, db_ih, db_hh, dw_hr), dc0 and dw_hr None where the layer has none, and dx, dh0
    and dc0 None where not wanted (fusedrnn._backward)."""
    cache = _find_cache(handle)
    arg, t = (_dev, _as_is) if isinstance(cache, fusedrnn._device.DeviceCache) else (_np, _from_np)
    g = fusedrnn._backward(cache, arg(dy), arg(dh_n), arg(dc_n), need_x, need_h0, need_c0)
    return (t(g["x"]), t(g["h0"]), t(g["c0"]), t(g["w_ih"]), t(g["w_hh"]), t(g["b_ih"]),
            t(g["b_hh"]), t(g["w_hr"]))


layer_backward = torch.library.custom_op("fusedrnn::layer_backward", mutates_args=())(
    _layer_backward)


@layer_backward.register_fake
def _layer_backward_fake(handle, dy, dh_n, dc_n, cell, batch_first, x_size, w_ih_size,
                         w_hh_size, w_hr_size, dtype, device=None):
    if device is None:  # not from the autograd formula: the gradients' device, else the CPU
        device = next((g.device for g in (dy, dh_n, dc_n) if g is not None), handle.device)
    new = lambda *shape: handle.new_empty(shape, dtype=dtype, device=device)  # noqa: E731
    B = x_size[0] if batch_first else x_size[1]
    H, P = _hidden_sizes(cell, w_hh_size, w_hr_size)
    return (new(*x_size), new(B, P), new(B, H) if cell == "lstm" else new(0),
            new(*w_ih_size), new(*w_hh_size), new(w_hh_size[0]), new(w_hh_size[0]),
            new(*w_hr_size) if w_hr_size is not None else new(0))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fusedrnn: double backward is not supported: the gradients of a fusedrnn layer are "
        "not differentiable, so backward/autograd.grad with create_graph=True (gradients of "
        "gradients, gradient penalties, Hessians) cannot pass through it; use torch.nn's "
        "RNN/LSTM/GRU where higher-order derivatives are needed")


layer_backward.register_autograd(_no_double_backward,
                                 setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------
# The call the modules make
# --------------------------------------------------------------------------

def run_layer(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
              w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
              batch_first: bool, checkpoint=False) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction, differentiable: (y, h_n, c_n or None).

    The cache for backward is kept only when autograd will need it (grad mode on and
    some input requires grad). checkpoint: as ``fusedrnn.forward`` (False, True or k).
    """
    ck = checkpoint_code(checkpoint)
    tensors = (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths)
    if torch.autograd.forward_ad._current_level >= 0:
        _no_forward_ad(tensors)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # In plain eager mode the implementation runs directly (inference) or through an
    # autograd.Function with the operator's own autograd formula (training): the
    # operator dispatch (fake tensors, torch.compile support, none of them needed
    # here) costs about 50 µs, six times a small layer's whole call. Anything else
    # (torch.compile, tensor subclasses, dispatch or function modes, functorch) goes
    # through the operator.
    if not _plain_eager(tensors):
        y, h_n, c_n, _ = torch.ops.fusedrnn.layer_forward(
            x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell, reverse, batch_first,
            training, ck)
        return y, h_n, (c_n if cell == "lstm" else None)
    if training:
        return _EagerLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths,
                                 (cell, reverse, batch_first, ck))
    # the implementation without the op's placeholders (empty c_n, handle)
    y, h_n, c_n, _ = _run_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, cell,
                                  reverse, batch_first, False, ck)
    return y, h_n, c_n


def direct_inference(tensors) -> bool:
    """Whether a module's whole stack can run on NumPy views (run_stack_inference):
    nothing will differentiate the call (grad mode off, or no tensor requires grad), no
    forward-mode AD level is open (run_layer refuses dual tensors), CPU tensors, and
    plain eager mode (_plain_eager). tensors[0] is the input."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return (torch.autograd.forward_ad._current_level < 0 and not _on_cuda(tensors[0])
            and _plain_eager(tensors))


def run_stack_inference(cell: str, x: Tensor, weights, h0: Optional[Tensor],
                        c0: Optional[Tensor], lengths: Optional[Tensor], D: int,
                        batch_first: bool, checkpoint) -> Tuple[Tensor, Tensor,
                                                                Optional[Tensor]]:
    """A module's layers and directions (``weights``: (w_ih, w_hh, b_ih, b_hh, w_hr) of
    layer l, direction d at l * D + d) for a call that direct_inference allows: the
    fusedrnn.forward calls run_layer makes, with training=False, on NumPy views of the
    tensors, and the outputs joined in NumPy, so that no tensor is made per layer and
    the checks of run_layer run once per module call. (y [T, B, D*P], h_n [L*D, B, P],
    c_n [L*D, B, H] or None). For a decoding step (RNN(256, 256), T = 1, B = 1) this
    took 36 µs where run_layer and the stacking took 51 µs. ``checkpoint`` (the module's
    attribute, as ``fusedrnn.forward`` takes it) keeps nothing at training=False; it is
    passed on so that an invalid value raises the same error as in training."""
    xs, hs, cs, lens = _np(x), _np(h0), _np(c0), _np(lengths)
    h_n: List[np.ndarray] = []
    c_n: List[np.ndarray] = []
    for layer in range(len(weights) // D):
        ys = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            y, h, c, _ = fusedrnn.forward(
                cell, xs, _np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh),
                None if hs is None else hs[k], None if cs is None else cs[k], lengths=lens,
                reverse=d == 1, batch_first=batch_first, training=False, w_hr=_np(w_hr),
                checkpoint=checkpoint)
            ys.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        xs = ys[0] if D == 1 else np.concatenate(ys, axis=2)
    return (torch.from_numpy(xs), torch.from_numpy(_np_stack(h_n)),
            torch.from_numpy(_np_stack(c_n)) if c_n else None)


def _np_stack(arrays: List[np.ndarray]) -> np.ndarray:
    """np.stack, by a view for one array (the common single-layer case)."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _no_forward_ad(tensors) -> None:
    """Forward-mode AD has no formula here: refuse dual inputs rather than return outputs
    without tangents (with grad mode off, nothing else would notice)."""
    fwd = torch.autograd.forward_ad
    if any(t is not None and fwd.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            "fusedrnn: forward-mode AD (torch.autograd.forward_ad dual tensors, "
            "torch.func.jvp) is not supported: fusedrnn's layers have no forward-mode "
            "formula; use reverse mode (backward/autograd.grad), or torch.nn's "
            "RNN/LSTM/GRU for forward-mode derivatives")


_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter: a Tensor with torch functions disabled


def _plain_eager(tensors) -> bool:
    """Whether calling an op's implementation directly does exactly what the op would:
    eager mode (not compiling, not under torch.jit.trace, which records operators, and
    no profiler, whose traces name them), plain CPU or CUDA tensors (meta tensors take
    the fake implementation), no torch function or dispatch mode, no functorch."""
    # (on the CPU or a CUDA device, the devices the real implementations run: is_cpu and
    # is_cuda take a third of the time of t.device.type)
    for t in tensors:  # (a loop: a generator in all() took half as long again)
        if t is not None and (type(t) not in _PLAIN or not (t.is_cpu or t.is_cuda)):
            return False
    return (not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None
            and not torch.autograd._profiler_enabled()
            and not torch._C._is_torch_function_mode_enabled()
            and torch.utils._python_dispatch._get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active())

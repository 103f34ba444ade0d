"""Fuzzing of the layers built on forward/backward: fusedrnn.models and fusedrnn.torch.

Models: random stacks (cell, layers, directions, sizes down to 1, T and B down to 0,
lengths / mask, float32 / float64) with arguments that are mostly, not always,
consistent. The compiled model and the same model on the NumPy reference backend
must agree: both succeed with the same outputs and gradients, or both raise the same
ValueError/TypeError.

torch adapter: random configurations (cell, layers, directions, batch_first, bias,
proj_size, padded or packed input, h0 or not) against torch.nn with the same weights:
outputs and every gradient within DESIGN.md section 7, or, for an input of the wrong
size, an error from both.

FUSEDRNN_FUZZ_EXAMPLES scales the example counts (default 300, as tests/test_fuzz.py).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedrnn
from fusedrnn import reference
from fusedrnn.models import RNNModel

from conftest import TOL, rel_err

EXAMPLES = int(os.environ.get("FUSEDRNN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=max(1, EXAMPLES // 3), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
CELLS = list(fusedrnn.CELLS)


# --------------------------------------------------------------------------
# fusedrnn.models
# --------------------------------------------------------------------------

@st.composite
def model_calls(draw):
    cfg = dict(cell=draw(st.sampled_from(CELLS)), input_size=draw(st.integers(1, 4)),
               hidden_size=draw(st.integers(1, 4)), output_size=draw(st.integers(1, 3)),
               num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
               output=draw(st.sampled_from(["sequence", "last"])),
               bias=draw(st.booleans()),
               dtype=draw(st.sampled_from([np.float32, np.float64])))
    T, B = draw(st.integers(0, 4)), draw(st.integers(0, 3))
    batch_first = draw(st.booleans())
    wrong = draw(st.sampled_from(["none"] * 4 + ["x_size", "x_dtype", "x_rank", "h0_shape",
                                                  "lengths", "mask_shape"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    I = cfg["input_size"] + (1 if wrong == "x_size" else 0)
    shape = (B, T, I) if batch_first else (T, B, I)
    if wrong == "x_rank":
        shape = shape[1:]
    dtype = np.int32 if wrong == "x_dtype" else cfg["dtype"]
    x = (rng.standard_normal(shape) * 0.5).astype(dtype)
    kw = {"batch_first": batch_first, "checkpoint": draw(st.sampled_from([False, True, 2]))}
    extra = draw(st.sampled_from(["none", "lengths", "mask"]))
    if extra == "lengths" or wrong == "lengths":
        hi = T + 2 if wrong == "lengths" else T + 1
        kw["lengths"] = rng.integers(0, hi, size=B)
    elif extra == "mask":
        m = (B, T) if batch_first else (T, B)
        kw["mask"] = rng.random((m[0] + (wrong == "mask_shape"), m[1])) < 0.6
    LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
    if draw(st.booleans()) or wrong == "h0_shape":
        kw["h0"] = (rng.standard_normal((LD + (wrong == "h0_shape"), B, cfg["hidden_size"]))
                    * 0.5).astype(cfg["dtype"])
    return cfg, x, kw, draw(st.integers(0, 2**16))


@SETTINGS
@given(model_calls())
def test_models_agree_with_the_reference_backend_or_both_raise(call):
    cfg, x, kw, seed = call
    results = []
    for backend in (None, reference):
        try:
            model = RNNModel(**cfg, seed=seed, backend=backend)
            out, h_n, c_n, cache = model.forward(x, **kw)
            dout = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
            grads, dx = model.backward(cache, dout)
            results.append((out, h_n, c_n, grads, dx))
        except (ValueError, TypeError) as e:
            results.append(e)
    fast, slow = results
    event("raised" if isinstance(fast, Exception) else "ran")
    if isinstance(fast, Exception) or isinstance(slow, Exception):
        assert type(fast) is type(slow), (fast, slow)
        assert str(fast) == str(slow)
        return
    tol = TOL[np.dtype(cfg["dtype"]).type]
    for a, b in zip(fast[:3], slow[:3]):
        assert rel_err(a, b) <= tol
    for i in (3, 4):  # parameter gradients, and those of x, h0, c0
        assert fast[i].keys() == slow[i].keys()
        for k in fast[i]:
            assert rel_err(fast[i][k], slow[i][k]) <= tol, k


# --------------------------------------------------------------------------
# fusedrnn.torch
# --------------------------------------------------------------------------

@st.composite
def torch_configs(draw):
    cell = draw(st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"]))
    H = draw(st.integers(1, 5))
    cfg = dict(input_size=draw(st.integers(1, 5)), hidden_size=H,
               num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
               batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if cell == "lstm" and H > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, H - 1))
    if cell.startswith("rnn"):
        cfg["nonlinearity"] = cell[4:]
    return (cell, cfg, draw(st.integers(1, 4)), draw(st.integers(1, 3)),
            draw(st.sampled_from(["padded", "packed"])), draw(st.booleans()),
            draw(st.sampled_from(["none"] * 5 + ["input_size"])), draw(st.integers(0, 2**16)))


@SETTINGS
@given(torch_configs())
def test_torch_adapter_matches_torch_nn(config):
    torch = pytest.importorskip("torch")
    import fusedrnn.torch as frnn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    cell, cfg, T, B, kind, with_h0, wrong, seed = config
    name = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    gen = torch.Generator().manual_seed(seed)
    ref = getattr(torch.nn, name)(**cfg, dtype=torch.float64)
    ours = getattr(frnn, name)(**cfg, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    I = cfg["input_size"] + (1 if wrong == "input_size" else 0)
    shape = (B, T, I) if cfg["batch_first"] else (T, B, I)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    D = 2 if cfg["bidirectional"] else 1
    P = cfg.get("proj_size", 0) or cfg["hidden_size"]
    hx = None
    if with_h0:
        h0 = torch.randn(cfg["num_layers"] * D, B, P, generator=gen, dtype=torch.float64)
        if cell == "lstm":
            c0 = torch.randn(cfg["num_layers"] * D, B, cfg["hidden_size"], generator=gen,
                             dtype=torch.float64)
            hx = (h0, c0)
        else:
            hx = h0
    lengths = torch.randint(1, T + 1, (B,), generator=gen)

    def run(module):
        xi = x.clone().requires_grad_(True)
        inp = (pack_padded_sequence(xi, lengths, batch_first=cfg["batch_first"],
                                    enforce_sorted=False) if kind == "packed" else xi)
        hxi = None
        if hx is not None:
            hxi = (tuple(h.clone().requires_grad_(True) for h in hx) if cell == "lstm"
                   else hx.clone().requires_grad_(True))
        y, state = module(inp, hxi)
        if kind == "packed":
            y, _ = pad_packed_sequence(y, batch_first=cfg["batch_first"], total_length=T)
        states = list(state) if cell == "lstm" else [state]
        w = torch.Generator().manual_seed(seed + 1)
        loss = sum((t * torch.randn(t.shape, generator=w, dtype=t.dtype)).sum()
                   for t in [y] + states)
        leaves = [xi] + list(module.parameters())
        if hxi is not None:
            leaves += list(hxi) if cell == "lstm" else [hxi]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [y] + states, grads

    event(f"{kind}, {wrong}")
    if wrong == "input_size":
        for module in (ref, ours):  # torch.nn: RuntimeError; the adapter: the same or ours
            with pytest.raises((RuntimeError, ValueError, TypeError)):
                run(module)
        return
    want, want_g = run(ref)
    got, got_g = run(ours)
    for a, b in zip(got, want):
        assert rel_err(a.detach().numpy(), b.detach().numpy()) <= TOL[np.float64]
    assert len(got_g) == len(want_g)
    for a, b in zip(got_g, want_g):
        if b is None:
            assert a is None or not a.abs().max() > 0
            continue
        assert rel_err(a.numpy(), b.numpy()) <= TOL[np.float64]

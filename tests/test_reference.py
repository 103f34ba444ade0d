"""Tests of the NumPy reference (fusedrnn.reference), the oracle for the compiled backend.

1. backward against central finite differences (float64), every cell and mode;
2. forward and backward against torch.nn.RNN / LSTM / GRU (skipped without torch);
3. the lengths / mask rule on its own, dtypes, cache behaviour, empty shapes,
   large pre-activations;
4. argument errors (raised by fusedrnn._validate).

Shape legend: T steps, B batch, I input size, H hidden size, G gates.
Every comparison prints its max abs and relative difference before asserting.
"""

import warnings

import numpy as np
import pytest

from fusedrnn import reference as ref
from fusedrnn._validate import GATES

CELLS = ["rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm", "gru"]
TORCH_CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]  # rnn_sigmoid has no torch equivalent
GRAD_KEYS = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def make_params(cell, T, B, I, H, *, dtype=np.float64, seed=0, batch_first=False, scale=0.6):
    """Random arguments of forward: x ([T,B,I] or [B,T,I]), weights, biases, h0, c0."""
    rng = np.random.default_rng(seed)
    GH = GATES[cell] * H
    xshape = (B, T, I) if batch_first else (T, B, I)
    p = {
        "x": rng.standard_normal(xshape),
        "w_ih": scale * rng.standard_normal((GH, I)),
        "w_hh": scale * rng.standard_normal((GH, H)),
        "b_ih": 0.3 * rng.standard_normal(GH),
        "b_hh": 0.3 * rng.standard_normal(GH),
        "h0": 0.5 * rng.standard_normal((B, H)),
        "c0": 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None,
    }
    return {k: (None if v is None else v.astype(dtype)) for k, v in p.items()}


def make_cotangents(cell, y, h_n, seed=1):
    """Random dy, dh_n, dc_n: the loss is L = <y, dy> + <h_n, dh_n> + <c_n, dc_n>."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(y.shape).astype(y.dtype)
    dh_n = rng.standard_normal(h_n.shape).astype(y.dtype)
    dc_n = rng.standard_normal(h_n.shape).astype(y.dtype) if cell == "lstm" else None
    return dy, dh_n, dc_n


def compare(name, got, want, rtol, atol_scale=1e-12):
    """Print max abs / relative (to want's scale) difference, then assert."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    rel = err / max(scale, atol_scale)
    print(f"  {name:6s} max|diff| {err:.3e}  scale {scale:.3e}  rel {rel:.3e}")
    assert rel <= rtol, f"{name}: relative difference {rel:.3e} > {rtol:.1e}"


def loss_of(cell, outputs, dy, dh_n, dc_n):
    y, h_n, c_n, _ = outputs
    total = np.sum(y * dy) + np.sum(h_n * dh_n)
    if cell == "lstm":
        total += np.sum(c_n * dc_n)
    return total


# --------------------------------------------------------------------------
# 1. finite differences
# --------------------------------------------------------------------------

T_FD, B_FD, I_FD = 4, 3, 3
FD_MODES = {
    # name: (forward keyword arguments, pass h0/c0/biases as None)
    "plain": ({}, False),
    "lengths": ({"lengths": np.array([0, T_FD, 2])}, False),
    "mask": ({"mask": np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], bool)}, False),
    "reverse_lengths": ({"reverse": True, "lengths": np.array([2, 0, T_FD])}, False),
    "reverse_mask": ({"reverse": True,
                      "mask": np.array([[0, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)},
                     False),
    "batch_first": ({"batch_first": True}, False),
    "batch_first_mask": ({"batch_first": True,
                          "mask": np.array([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1]], bool)},
                         False),
    "defaults": ({}, True),  # no h0, c0, b_ih, b_hh: gradients wrt the zeros they stand for
}


@pytest.mark.parametrize("mode", list(FD_MODES))
@pytest.mark.parametrize("cell", CELLS)
def test_backward_matches_finite_differences(cell, mode):
    kw, defaults = FD_MODES[mode]
    H = 3 if cell in ("rnn_tanh", "rnn_relu", "rnn_sigmoid") else 2
    p = make_params(cell, T_FD, B_FD, I_FD, H, batch_first=kw.get("batch_first", False),
                    seed=10 * CELLS.index(cell) + list(FD_MODES).index(mode))
    if defaults:  # the None arguments are zeros; finite differences perturb those zeros
        for k in ("h0", "c0", "b_ih", "b_hh"):
            if p[k] is not None:
                p[k] = np.zeros_like(p[k])
    call = {k: (None if defaults and k in ("h0", "c0", "b_ih", "b_hh") else v)
            for k, v in p.items()}

    out = ref.forward(cell, **call, **kw)
    dy, dh_n, dc_n = make_cotangents(cell, out[0], out[1])
    grads = ref.backward(out[3], dy, dh_n, dc_n)
    assert set(grads) == set(GRAD_KEYS) | {"w_hr"}
    assert grads["w_hr"] is None  # no projection here (see tests/test_projection.py)

    def loss():
        return loss_of(cell, ref.forward(cell, **p, **kw, training=False), dy, dh_n, dc_n)

    eps = 1e-6
    print(f"\n{cell} {mode}")
    for k in GRAD_KEYS:
        if p[k] is None:
            assert grads[k] is None, f"grad {k} should be None for {cell}"
            continue
        arr, num = p[k], np.zeros_like(p[k])
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss()
            arr[idx] = old - eps
            down = loss()
            arr[idx] = old
            num[idx] = (up - down) / (2 * eps)
        assert grads[k].dtype == arr.dtype
        compare(k, grads[k], num, rtol=1e-6, atol_scale=1e-3)


# --------------------------------------------------------------------------
# 2. torch parity
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_layer(torch, cell, p, I, H, batch_first, bidirectional, suffix):
    """A single-layer torch module (float64) holding p's weights in direction ``suffix``."""
    kw = dict(input_size=I, hidden_size=H, num_layers=1, bias=True,
              batch_first=batch_first, bidirectional=bidirectional)
    if cell.startswith("rnn_"):
        m = torch.nn.RNN(nonlinearity=cell[4:], **kw)
    else:
        m = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](**kw)
    m = m.double()
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            kind, which = name.split("_")
            getattr(m, f"{'weight' if kind == 'w' else 'bias'}_{which}_l0{suffix}").copy_(
                torch.from_numpy(p[name]))
    return m


TORCH_MODES = {
    "plain": {},
    "batch_first": {"batch_first": True},
    "lengths": {"lengths": True},
    "lengths_batch_first": {"lengths": True, "batch_first": True},
    "reverse": {"reverse": True},
    "reverse_lengths": {"reverse": True, "lengths": True},
    "reverse_lengths_batch_first": {"reverse": True, "lengths": True, "batch_first": True},
}


@pytest.mark.parametrize("mode", list(TORCH_MODES))
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_matches_torch(torch, cell, mode):
    opts = TORCH_MODES[mode]
    bf, reverse = opts.get("batch_first", False), opts.get("reverse", False)
    T, B, I, H = 5, 4, 3, 4
    p = make_params(cell, T, B, I, H, batch_first=bf, seed=7)
    lengths = np.array([3, T, 1, 4]) if opts.get("lengths") else None  # torch needs >= 1

    y, h_n, c_n, cache = ref.forward(cell, **p, lengths=lengths, reverse=reverse,
                                     batch_first=bf)
    dy, dh_n, dc_n = make_cotangents(cell, y, h_n)
    grads = ref.backward(cache, dy, dh_n, dc_n)

    # torch: the reverse rule is the reverse direction of a bidirectional module
    torch.manual_seed(0)
    d = 1 if reverse else 0
    m = torch_layer(torch, cell, p, I, H, bf, reverse, "_reverse" if reverse else "")
    x_t = torch.tensor(p["x"], requires_grad=True)

    def initial(a):  # [D, B, H]; the unused forward direction starts at zeros
        full = np.zeros((2, B, H)) if reverse else np.zeros((1, B, H))
        full[d] = a
        return torch.tensor(full, requires_grad=True)

    h0_t = initial(p["h0"])
    c0_t = initial(p["c0"]) if cell == "lstm" else None
    inp = x_t
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            x_t, torch.from_numpy(lengths), batch_first=bf, enforce_sorted=False)
    out, state = m(inp, (h0_t, c0_t) if cell == "lstm" else h0_t)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=bf, total_length=T)
    out = out[..., H:] if reverse else out
    hn_t, cn_t = state if cell == "lstm" else (state, None)
    loss = (out * torch.from_numpy(dy)).sum() + (hn_t[d] * torch.from_numpy(dh_n)).sum()
    if cell == "lstm":
        loss = loss + (cn_t[d] * torch.from_numpy(dc_n)).sum()
    loss.backward()

    sfx = "_reverse" if reverse else ""
    print(f"\n{cell} {mode}")
    compare("y", y, out.detach().numpy(), 1e-10)
    compare("h_n", h_n, hn_t[d].detach().numpy(), 1e-10)
    if cell == "lstm":
        compare("c_n", c_n, cn_t[d].detach().numpy(), 1e-10)
        compare("dc0", grads["c0"], c0_t.grad[d].numpy(), 1e-10)
    compare("dx", grads["x"], x_t.grad.numpy(), 1e-10)
    compare("dh0", grads["h0"], h0_t.grad[d].numpy(), 1e-10)
    compare("dw_ih", grads["w_ih"], getattr(m, "weight_ih_l0" + sfx).grad.numpy(), 1e-10)
    compare("dw_hh", grads["w_hh"], getattr(m, "weight_hh_l0" + sfx).grad.numpy(), 1e-10)
    compare("db_ih", grads["b_ih"], getattr(m, "bias_ih_l0" + sfx).grad.numpy(), 1e-10)
    compare("db_hh", grads["b_hh"], getattr(m, "bias_hh_l0" + sfx).grad.numpy(), 1e-10)


# --------------------------------------------------------------------------
# 3. the validity rule, dtypes, cache, empty shapes, large pre-activations
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_mask_equals_running_the_valid_steps_only(cell, reverse):
    """A masked row behaves as if its invalid steps were cut out of the sequence."""
    T, B, I, H = 6, 3, 2, 3
    p = make_params(cell, T, B, I, H, seed=3)
    mask = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1]], bool)
    x = p["x"].copy()
    x[~mask] = np.nan  # missing values never enter the computation
    y, h_n, c_n, cache = ref.forward(cell, **{**p, "x": x}, mask=mask, reverse=reverse)
    print(f"\n{cell} reverse={reverse}")
    for b in range(B):
        rows = np.flatnonzero(mask[:, b])
        one = {k: (None if v is None else v[b:b + 1]) for k, v in p.items()
               if k in ("h0", "c0")}
        yb, hb, cb, _ = ref.forward(cell, p["x"][rows, b:b + 1], p["w_ih"], p["w_hh"],
                                    p["b_ih"], p["b_hh"], **one, reverse=reverse)
        compare(f"y[{b}]", y[rows, b], yb[:, 0], 1e-13)
        compare(f"h_n[{b}]", h_n[b], hb[0], 1e-13)
        if cell == "lstm":
            compare(f"c_n[{b}]", c_n[b], cb[0], 1e-13)
    # at an invalid step y is the carried state: the h of the previous valid step (or h0)
    h = p["h0"].copy()
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = np.where(mask[t][:, None], y[t], h)
        compare(f"y[{t}]", y[t], h, 0.0)
    # gradients stay finite and dx is zero where x was missing
    grads = ref.backward(cache, np.ones_like(y), np.ones_like(h_n),
                         np.ones_like(c_n) if cell == "lstm" else None)
    assert all(np.isfinite(g).all() for g in grads.values() if g is not None)
    assert not grads["x"][~mask].any()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_lengths_rule(cell, reverse):
    """Padding outputs are 0, lengths 0 returns h0, padded x never enters."""
    T, B, I, H = 5, 4, 2, 3
    p = make_params(cell, T, B, I, H, seed=4)
    lengths = np.array([0, 2, T, 3])
    valid = np.arange(T)[:, None] < lengths
    x = p["x"].copy()
    x[~valid] = np.nan
    y, h_n, c_n, cache = ref.forward(cell, **{**p, "x": x}, lengths=lengths, reverse=reverse)
    print(f"\n{cell} reverse={reverse}")
    assert not y[~valid].any()
    compare("h_n[0]", h_n[0], p["h0"][0], 0.0)
    if cell == "lstm":
        compare("c_n[0]", c_n[0], p["c0"][0], 0.0)
    for b in range(1, B):  # each row equals the unpadded sequence run on its own
        one = {k: (None if v is None else v[b:b + 1]) for k, v in p.items()
               if k in ("h0", "c0")}
        yb, hb, _, _ = ref.forward(cell, p["x"][:lengths[b], b:b + 1], p["w_ih"], p["w_hh"],
                                   p["b_ih"], p["b_hh"], **one, reverse=reverse)
        compare(f"y[{b}]", y[:lengths[b], b], yb[:, 0], 1e-13)
        compare(f"h_n[{b}]", h_n[b], hb[0], 1e-13)
    grads = ref.backward(cache, np.ones_like(y), None, None)
    assert all(np.isfinite(g).all() for g in grads.values() if g is not None)
    assert not grads["x"][~valid].any()
    compare("dh0[0]", grads["h0"][0], np.zeros(H), 0.0)  # dy of a length-0 row is ignored


@pytest.mark.parametrize("cell", CELLS)
def test_float32_agrees_with_float64(cell):
    T, B, I, H = 6, 3, 4, 5
    p64 = make_params(cell, T, B, I, H, seed=5)
    p32 = {k: (None if v is None else v.astype(np.float32)) for k, v in p64.items()}
    lengths = np.array([T, 2, 5])
    o64 = ref.forward(cell, **p64, lengths=lengths)
    o32 = ref.forward(cell, **p32, lengths=lengths)
    cot = make_cotangents(cell, o64[0], o64[1])
    g64 = ref.backward(o64[3], *cot)
    g32 = ref.backward(o32[3], *(None if c is None else c.astype(np.float32) for c in cot))
    print(f"\n{cell}")
    for name, a, b in [("y", o32[0], o64[0]), ("h_n", o32[1], o64[1]), ("c_n", o32[2], o64[2])]:
        if b is not None:
            assert a.dtype == np.float32
            compare(name, a, b, 1e-5)
    for k in GRAD_KEYS:
        if g64[k] is not None:
            assert g32[k].dtype == np.float32, k
            compare(k, g32[k], g64[k], 1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_cache_and_repeated_backward(cell):
    T, B, I, H = 4, 3, 3, 4
    p = make_params(cell, T, B, I, H, seed=6)
    y, h_n, c_n, cache = ref.forward(cell, **p, mask=np.random.default_rng(0).random((T, B)) < .7)
    print(f"\n{cell} cache: {cache!r}")
    assert cache.nbytes > 0
    assert (cache.cell, cache.T, cache.B, cache.H, cache.dtype, cache.batch_first) == \
        (cell, T, B, H, np.float64, False)
    dy, dh_n, dc_n = make_cotangents(cell, y, h_n)
    saved = [a.copy() for a in (dy, dh_n) + ((dc_n,) if dc_n is not None else ())]
    g1 = ref.backward(cache, dy, dh_n, dc_n)
    g2 = ref.backward(cache, dy, dh_n, dc_n)
    for k in GRAD_KEYS:
        if g1[k] is None:
            assert g2[k] is None
        else:
            assert np.array_equal(g1[k], g2[k]), k
    for a, b in zip(saved, (dy, dh_n, dc_n)):  # arguments are not modified
        assert np.array_equal(a, b)
    # dy=None is zeros
    g0 = ref.backward(cache, None, dh_n, dc_n)
    gz = ref.backward(cache, np.zeros_like(y), dh_n, dc_n)
    for k in GRAD_KEYS:
        if g0[k] is not None:
            assert np.array_equal(g0[k], gz[k]), k
    # training=False: same outputs, no cache
    y2, h2, c2, cache2 = ref.forward(cell, **p, mask=np.random.default_rng(0).random((T, B)) < .7,
                                     training=False)
    assert cache2 is None
    assert np.array_equal(y, y2) and np.array_equal(h_n, h2)
    # inputs are copied into the cache: changing them afterwards changes nothing
    for k in ("x", "w_ih", "w_hh", "h0"):
        p[k][...] = 99.0
    g3 = ref.backward(cache, dy, dh_n, dc_n)
    for k in GRAD_KEYS:
        if g1[k] is not None:
            assert np.array_equal(g1[k], g3[k]), k


@pytest.mark.parametrize("cell", CELLS)
def test_odd_layouts_just_work(cell):
    """Read-only, Fortran-order and strided inputs give the contiguous results."""
    T, B, I, H = 4, 3, 3, 2
    p = make_params(cell, T, B, I, H, seed=11)
    lengths = np.array([4, 1, 0], np.int32)
    want = ref.forward(cell, **p, lengths=lengths)
    odd = {}
    for k, v in p.items():
        if v is None:
            continue
        v = np.asfortranarray(v) if v.ndim > 1 else np.repeat(v, 2)[::2]  # strided 1-D
        v.flags.writeable = False
        odd[k] = v
    got = ref.forward(cell, **{**p, **odd}, lengths=lengths)
    dy, dh_n, dc_n = make_cotangents(cell, want[0], want[1])
    gw = ref.backward(want[3], dy, dh_n, dc_n)
    gg = ref.backward(got[3], np.asfortranarray(dy), dh_n, dc_n)
    print(f"\n{cell}")
    for name, a, b in [("y", got[0], want[0]), ("h_n", got[1], want[1])]:
        compare(name, a, b, 1e-13)
    for k in GRAD_KEYS:
        if gw[k] is not None:
            compare(k, gg[k], gw[k], 1e-13)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("cell", CELLS)
def test_empty(cell, T, B, batch_first):
    I, H = 2, 3
    p = make_params(cell, T, B, I, H, seed=8, batch_first=batch_first)
    kw = {"lengths": np.zeros(B, np.int64)} if T == 0 else {}
    y, h_n, c_n, cache = ref.forward(cell, **p, batch_first=batch_first, **kw)
    assert y.shape == ((B, T, H) if batch_first else (T, B, H))
    assert np.array_equal(h_n, p["h0"]) and h_n is not p["h0"]
    if cell == "lstm":
        assert np.array_equal(c_n, p["c0"]) and c_n is not p["c0"]
    else:
        assert c_n is None
    rng = np.random.default_rng(0)
    dh_n = rng.standard_normal((B, H))
    grads = ref.backward(cache, None, dh_n, None)
    for k in GRAD_KEYS:
        want = p[k]
        if want is None:
            assert grads[k] is None
            continue
        assert grads[k].shape == want.shape, k
    assert np.array_equal(grads["h0"], dh_n)  # no steps: dh_n flows straight to h0
    for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh"):
        assert not grads[k].any(), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_large_preactivations_stay_finite_without_warnings(cell, dtype):
    T, B, I, H = 5, 3, 3, 4
    p = make_params(cell, T, B, I, H, seed=9, dtype=dtype)
    p["w_ih"] = (p["w_ih"] * 1e4).astype(dtype)  # input pre-activations around +-1e4
    p["b_ih"][:] = 1e4
    p["b_hh"][:] = -2e4
    gx = np.einsum("tbi,gi->tbg", p["x"], p["w_ih"]) + p["b_ih"]
    print(f"\n{cell} {np.dtype(dtype)}: max |W_ih x + b_ih| = {np.abs(gx).max():.3e}")
    assert np.abs(gx).max() > 1e4
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        y, h_n, c_n, cache = ref.forward(cell, **p, lengths=np.array([T, 3, 0]))
        dy, dh_n, dc_n = make_cotangents(cell, y, h_n)
        grads = ref.backward(cache, dy, dh_n, dc_n)
    for name, a in [("y", y), ("h_n", h_n), ("c_n", c_n)] + list(grads.items()):
        if a is not None:
            assert a.dtype == dtype, name
            assert np.isfinite(a).all(), name


def test_sigmoid_is_stable():
    v = np.array([-1e4, -800.0, -40.0, 0.0, 40.0, 800.0, 1e4])
    with np.errstate(all="raise"):
        s = ref._sigmoid(v)
        s32 = ref._sigmoid(v.astype(np.float32))
    print("\nsigmoid:", s)
    assert s32.dtype == np.float32
    assert np.all((s >= 0) & (s <= 1)) and s[0] == 0 and s[-1] == 1 and s[3] == 0.5


# --------------------------------------------------------------------------
# 4. argument errors (from fusedrnn._validate)
# --------------------------------------------------------------------------

def test_errors():
    p = make_params("gru", 4, 2, 3, 5, seed=10)
    with pytest.raises(ValueError, match="w_hh"):
        ref.forward("gru", **{**p, "w_hh": np.zeros((14, 5))})
    with pytest.raises(TypeError, match="dtype"):
        ref.forward("gru", **{**p, "w_ih": p["w_ih"].astype(np.float32)})
    with pytest.raises(ValueError, match="lengths"):
        ref.forward("gru", **p, lengths=np.array([2, 5]))
    with pytest.raises(ValueError, match="c0"):
        ref.forward("gru", **{**p, "c0": np.zeros((2, 5))})
    with pytest.raises(TypeError, match="cache"):
        ref.backward(None, np.zeros((4, 2, 5)))
    y, _, _, cache = ref.forward("gru", **p)
    with pytest.raises(ValueError, match="dy"):
        ref.backward(cache, np.zeros((4, 3, 5)))
    with pytest.raises(ValueError, match="dc_n"):
        ref.backward(cache, y, None, np.zeros((2, 5)))

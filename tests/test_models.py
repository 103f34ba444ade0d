"""Tests of fusedrnn.models: stacks, directions, output layer, losses, TBPTT, save/load.

Oracles: a stack composed here layer by layer from ``fusedrnn.reference`` (float64),
central finite differences of the whole loss, and torch.nn where installed.
"""

import zipfile

import numpy as np
import pytest

from fusedrnn import models, reference
from fusedrnn.models import RNN, Linear, RNNModel, cross_entropy, mse_loss

from conftest import assert_close

try:
    import torch
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

T, B, I, H, O, L = 6, 4, 3, 4, 2, 2
F64 = np.float64


def make_data(rng, cell, mode, batch_first=False, dtype=F64, output="sequence"):
    """x, target, and lengths/mask keyword arguments for the model and the loss."""
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    kw = {}
    if mode == "lengths":
        kw["lengths"] = np.array([T, 0, 3, 5])
    elif mode == "mask":
        m = rng.random((T, B)) < 0.7
        kw["mask"] = m.T.copy() if batch_first else m
    tshape = (x.shape[0], x.shape[1], O) if output == "sequence" else (B, O)
    return x, rng.standard_normal(tshape).astype(dtype), kw


def loss_kw(model, kw):
    return kw if model.output == "sequence" else {}


# --------------------------------------------------------------------------
# The stack vs the reference composed layer by layer
# --------------------------------------------------------------------------

def composed(cell, params, x, target, output, bidirectional, kw, loss="mse"):
    """Forward, loss and gradients of the stack + output layer, written out directly
    with fusedrnn.reference (time-major, dropout 0)."""
    D = 2 if bidirectional else 1
    sfx = ["", "_reverse"]
    caches, inp, hn = [], x, {}
    for layer in range(L):
        outs, lc = [], []
        for d in range(D):
            n = f"l{layer}{sfx[d]}"
            y, h_n, c_n, cache = reference.forward(
                cell, inp, params[f"rnn.weight_ih_{n}"], params[f"rnn.weight_hh_{n}"],
                params[f"rnn.bias_ih_{n}"], params[f"rnn.bias_hh_{n}"], reverse=bool(d), **kw)
            outs.append(y)
            lc.append(cache)
            hn[(layer, d)] = h_n
        caches.append(lc)
        inp = np.concatenate(outs, axis=-1)
    W, b = params["linear.weight"], params["linear.bias"]
    feats = inp if output == "sequence" else np.concatenate([hn[(L - 1, d)] for d in range(D)], -1)
    out = feats @ W.T + b
    lkw = kw if output == "sequence" else {}
    if loss == "mse":
        value, dout = mse_loss(out, target, **lkw)
    else:
        value, dout = cross_entropy(out, target, **lkw)
    grads = {"linear.weight": dout.reshape(-1, O).T @ feats.reshape(-1, feats.shape[-1]),
             "linear.bias": dout.reshape(-1, O).sum(0)}
    dfeats = dout @ W
    dy = dfeats if output == "sequence" else None
    dh_top = None if output == "sequence" else dfeats
    for layer in reversed(range(L)):
        dx = 0
        for d in range(D):
            n = f"l{layer}{sfx[d]}"
            dyd = None if dy is None else dy[..., d * H:(d + 1) * H]
            dhn = dh_top[:, d * H:(d + 1) * H] if (dh_top is not None and layer == L - 1) else None
            g = reference.backward(caches[layer][d], dyd, dhn)
            grads[f"rnn.weight_ih_{n}"], grads[f"rnn.weight_hh_{n}"] = g["w_ih"], g["w_hh"]
            grads[f"rnn.bias_ih_{n}"], grads[f"rnn.bias_hh_{n}"] = g["b_ih"], g["b_hh"]
            dx = dx + g["x"]
        dy = dx
    return out, value, grads, dy


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("output", ["sequence", "last"])
@pytest.mark.parametrize("mode", ["plain", "lengths", "mask"])
def test_stack_matches_reference_composed_layer_by_layer(cell, output, mode, rng):
    model = RNNModel(cell, I, H, O, L, bidirectional=True, output=output, dtype=F64, seed=1)
    x, target, kw = make_data(rng, cell, mode, output=output)
    out, h_n, c_n, cache = model.forward(x, **kw)
    value, dout = mse_loss(out, target, **loss_kw(model, kw))
    grads, dinputs = model.backward(cache, dout)

    r_out, r_value, r_grads, r_dx = composed(cell, model.params, x, target, output, True, kw)
    assert h_n.shape == (L * 2, B, H) and (c_n is None) == (cell != "lstm")
    assert_close("out", out, r_out, 1e-10)
    assert abs(value - r_value) <= 1e-10 * max(1.0, abs(r_value))
    assert list(grads) == list(model.params)
    for k in r_grads:
        assert_close(k[-14:], grads[k], r_grads[k], 1e-10)
    assert_close("dx", dinputs["x"], r_dx, 1e-10)


def test_reference_backend_gives_same_model_results(rng):
    kw = dict(bidirectional=True, dropout=0.4, dtype=F64, seed=7)
    fast = RNNModel("lstm", I, H, O, L, **kw)
    slow = RNNModel("lstm", I, H, O, L, backend=reference, **kw)
    for k in fast.params:
        assert np.array_equal(fast.params[k], slow.params[k])  # same seed, same init
    x, target, kw = make_data(rng, "lstm", "lengths")
    a, _, _, ca = fast.forward(x, **kw)
    b, _, _, cb = slow.forward(x, **kw)  # same dropout masks
    assert_close("out", a, b, 1e-10)
    ga, _ = fast.backward(ca, a - target)
    gb, _ = slow.backward(cb, b - target)
    for k in ga:
        assert_close(k[-14:], ga[k], gb[k], 1e-10)


@pytest.mark.parametrize("checkpoint", [True, 2])
def test_checkpointed_stack_gives_the_same_gradients(checkpoint, rng):
    kw = dict(bidirectional=True, dtype=F64, seed=3)
    model = RNNModel("gru", I, H, O, L, **kw)
    x, target, kw = make_data(rng, "gru", "lengths")
    a, _, _, full = model.forward(x, **kw)
    b, _, _, ck = model.forward(x, **kw, checkpoint=checkpoint)
    np.testing.assert_array_equal(a, b)  # forward outputs are bitwise the same
    assert all(c.checkpoint == (3 if checkpoint is True else 2)
               for layer in ck.rnn.caches for c in layer)
    ga, _ = model.backward(full, a - target)
    gb, _ = model.backward(ck, b - target)
    for k in ga:
        assert_close(k[-14:], gb[k], ga[k], 1e-12)


# --------------------------------------------------------------------------
# Finite differences of the whole loss (parameters, x, h0, c0), dropout included
# --------------------------------------------------------------------------

def _fd_check(f, arr, analytic, rng, n=6, eps=1e-6):
    """Central differences at ``n`` random entries of ``arr`` (modified in place, restored)."""
    flat = arr.reshape(-1)
    idx = rng.choice(flat.size, size=min(n, flat.size), replace=False)
    num = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        num[j] = (fp - fm) / (2 * eps)
    ana = analytic.reshape(-1)[idx]
    err = np.max(np.abs(num - ana)) / max(1e-3, np.max(np.abs(ana)))
    return err


@pytest.mark.parametrize("cell,output,loss,mode", [
    ("lstm", "sequence", "ce", "lengths"),
    ("gru", "last", "mse", "mask"),
    ("rnn_tanh", "sequence", "mse", "plain"),
])
def test_gradients_match_finite_differences(cell, output, loss, mode, rng):
    model = RNNModel(cell, I, H, O, L, bidirectional=True, dropout=0.3, output=output,
                     dtype=F64, seed=3)
    x, target, kw = make_data(rng, cell, mode, output=output)
    if loss == "ce":
        target = rng.integers(0, O, size=target.shape[:-1])
    lossfn = mse_loss if loss == "mse" else cross_entropy
    lkw = loss_kw(model, kw)
    h0 = rng.standard_normal((L * 2, B, H)) * 0.5
    c0 = rng.standard_normal((L * 2, B, H)) * 0.5 if cell == "lstm" else None

    def f():
        model.reseed(11)  # the same dropout masks at every evaluation
        out = model.forward(x, h0, c0, **kw)[0]
        return lossfn(out, target, **lkw)[0]

    model.reseed(11)
    out, _, _, cache = model.forward(x, h0, c0, **kw)
    _, dout = lossfn(out, target, **lkw)
    grads, dinputs = model.backward(cache, dout)
    worst = 0.0
    for name, p in model.params.items():
        err = _fd_check(f, p, grads[name], rng)
        worst = max(worst, err)
        assert err < 1e-6, (name, err)
    for name, arr in (("x", x), ("h0", h0), ("c0", c0)):
        if arr is not None:
            err = _fd_check(f, arr, dinputs[name], rng)
            assert err < 1e-6, (name, err)
    print(f"worst relative finite-difference error {worst:.2e}")


def test_dh_n_and_dc_n_flow_into_the_stack(rng):
    model = RNN("lstm", I, H, L, bidirectional=True, dtype=F64, seed=0)
    x = rng.standard_normal((T, B, I))
    wh = rng.standard_normal((L * 2, B, H))
    wc = rng.standard_normal((L * 2, B, H))

    def f():
        _, h_n, c_n, _ = model.forward(x, training=False)
        return float(np.sum(h_n * wh) + np.sum(c_n * wc))

    _, _, _, cache = model.forward(x)
    grads, dinputs = model.backward(cache, None, wh, wc)
    for name in ("weight_hh_l0", "weight_ih_l1_reverse", "bias_hh_l1"):
        assert _fd_check(f, model.params[name], grads[name], rng) < 1e-6
    assert _fd_check(f, x, dinputs["x"], rng) < 1e-6


# --------------------------------------------------------------------------
# torch.nn parity (weights load by name)
# --------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_matches_torch_nn_with_packed_sequences(cell, rng):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    model = RNNModel(cell, I, H, O, L, bidirectional=True, dtype=F64, seed=2)
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[cell]
    net = getattr(torch.nn, kind)(I, H, L, bidirectional=True, dtype=torch.float64)
    lin = torch.nn.Linear(2 * H, O, dtype=torch.float64)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(torch.from_numpy(model.params["rnn." + k]))
        lin.weight.copy_(torch.from_numpy(model.params["linear.weight"]))
        lin.bias.copy_(torch.from_numpy(model.params["linear.bias"]))
    x, target, kw = make_data(rng, cell, "lengths")
    lengths = kw["lengths"]
    keep = lengths > 0  # torch rejects empty rows
    x, target, lengths = x[:, keep], target[:, keep], lengths[keep]

    out, h_n, _, cache = model.forward(x, lengths=lengths)
    value, dout = mse_loss(out, target, lengths=lengths)
    grads, dinputs = model.backward(cache, dout)

    tx = torch.from_numpy(x).requires_grad_(True)
    packed = pack_padded_sequence(tx, torch.from_numpy(lengths), enforce_sorted=False)
    ty, th = net(packed)
    ty, _ = pad_packed_sequence(ty, total_length=T)
    th = th[0] if cell == "lstm" else th
    tout = lin(ty)
    valid = torch.from_numpy(np.arange(T)[:, None] < lengths[None, :])
    tloss = ((tout - torch.from_numpy(target)) ** 2)[valid].mean()
    tloss.backward()
    assert abs(value - tloss.item()) < 1e-12
    assert_close("h_n", h_n, th.detach().numpy(), 1e-10)
    assert_close("dx", dinputs["x"], tx.grad.numpy(), 1e-10)
    for k, p in net.named_parameters():
        assert_close(k, grads["rnn." + k], p.grad.numpy(), 1e-10)
    assert_close("dW_out", grads["linear.weight"], lin.weight.grad.numpy(), 1e-10)


# --------------------------------------------------------------------------
# Layout, initialisation, dropout, batch_first
# --------------------------------------------------------------------------

def test_parameter_names_shapes_and_init_follow_torch():
    m = RNN("gru", 5, 7, 3, bidirectional=True, seed=0)
    names = [f"{w}_l{k}{s}" for k in range(3) for s in ("", "_reverse")
             for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert list(m.params) == names
    assert m.params["weight_ih_l0"].shape == (21, 5)
    assert m.params["weight_ih_l1_reverse"].shape == (21, 14)  # I of layer k>0 is D*H
    assert m.params["weight_hh_l2"].shape == (21, 7)
    allp = np.concatenate([p.ravel() for p in m.params.values()])
    bound = 1 / np.sqrt(7)
    assert allp.dtype == np.float32 and np.abs(allp).max() <= bound
    assert np.abs(allp).max() > 0.9 * bound and abs(allp.mean()) < 0.05  # uniform spread
    nb = RNN("lstm", 2, 3, bias=False)
    assert list(nb.params) == ["weight_ih_l0", "weight_hh_l0"]
    y, *_ = nb.forward(np.zeros((2, 1, 2), np.float32), training=False)
    assert np.all(y == 0)


def test_same_seed_same_results_different_seed_different():
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)

    def run(seed):
        m = RNNModel("lstm", I, H, O, 3, dropout=0.5, seed=seed)
        return m.forward(x)[0]

    assert np.array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))
    m = RNNModel("lstm", I, H, O, 3, dropout=0.5, seed=5)
    a = m.forward(x)[0]
    b = m.forward(x)[0]  # the generator advances: new masks
    assert not np.array_equal(a, b)
    m.reseed(1)
    c = m.forward(x)[0]
    m.reseed(1)
    assert np.array_equal(c, m.forward(x)[0])
    # no dropout when not training
    e1 = m.forward(x, training=False)[0]
    e2 = RNNModel("lstm", I, H, O, 3, dropout=0.0, seed=5).forward(x, training=False)[0]
    assert np.array_equal(e1, e2)


def test_dropout_rate_and_scaling(rng):
    m = RNN("rnn_relu", 4, 64, 2, dropout=0.25, dtype=F64, seed=0)
    x = rng.standard_normal((20, 8, 4))
    _, _, _, cache = m.forward(x)
    mask = cache.drop_masks[1]
    assert cache.drop_masks[0] is None  # no dropout on the model's input
    assert set(np.unique(mask)) <= {0.0, 1 / 0.75}
    assert abs((mask == 0).mean() - 0.25) < 0.03


@pytest.mark.parametrize("mode", ["lengths", "mask"])
def test_batch_first_equals_time_major(mode, rng):
    m = RNNModel("gru", I, H, O, L, bidirectional=True, dtype=F64, seed=0)
    x, target, kw = make_data(rng, "gru", mode)
    out, h_n, _, cache = m.forward(x, **kw)
    g, d = m.backward(cache, target)
    kwb = dict(kw)
    if "mask" in kw:
        kwb["mask"] = kw["mask"].T
    outb, h_nb, _, cacheb = m.forward(x.transpose(1, 0, 2), batch_first=True, **kwb)
    gb, db = m.backward(cacheb, target.transpose(1, 0, 2))
    assert_close("out", outb.transpose(1, 0, 2), out, 1e-12)
    assert_close("h_n", h_nb, h_n, 1e-12)
    assert_close("dx", db["x"].transpose(1, 0, 2), d["x"], 1e-12)
    for k in g:
        assert_close(k[-12:], gb[k], g[k], 1e-12)


def test_last_output_is_y_at_each_rows_last_valid_step(rng):
    m = RNNModel("lstm", I, H, O, L, output="last", dtype=F64, seed=0)
    x, _, kw = make_data(rng, "lstm", "lengths")
    out = m.predict(x, **kw)
    y, *_ = m.rnn.forward(x, training=False, **kw)
    lengths = kw["lengths"]
    for b in range(B):
        feat = y[lengths[b] - 1, b] if lengths[b] else np.zeros(H)
        assert np.allclose(out[b], m.linear.forward(feat), atol=1e-12)


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------

def test_mse_masks_padding_even_nan(rng):
    pred = rng.standard_normal((T, B, O))
    target = rng.standard_normal((T, B, O))
    lengths = np.array([T, 0, 3, 5])
    valid = np.arange(T)[:, None] < lengths
    pred[~valid] = np.nan
    value, grad = mse_loss(pred, target, lengths=lengths)
    d = (pred - target)[valid]
    assert np.isclose(value, np.mean(d ** 2))
    assert np.all(grad[~valid] == 0)
    assert np.allclose(grad[valid], 2 * d / d.size)
    s, _ = mse_loss(pred, target, lengths=lengths, reduction="sum")
    assert np.isclose(s, np.sum(d ** 2))


@pytest.mark.parametrize("per", ["step", "sequence"])
def test_cross_entropy_value_and_gradient(per, rng):
    shape = (T, B) if per == "step" else (B,)
    logits = rng.standard_normal(shape + (5,)) * 3
    target = rng.integers(0, 5, size=shape)
    kw = {}
    if per == "step":
        kw["mask"] = rng.random(shape) < 0.6
        target[~kw["mask"]] = -1  # invalid positions may hold anything
    value, grad = cross_entropy(logits, target, **kw)
    valid = kw.get("mask", np.ones(shape, bool))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ref = -np.mean(np.log(p[valid, target[valid]]))
    assert np.isclose(value, ref)
    eps = 1e-6
    for i in np.ndindex(*logits.shape):
        if not valid[i[:-1]]:
            assert grad[i] == 0
            continue
        if rng.random() > 0.2:
            continue
        lp = logits.copy()
        lp[i] += eps
        lm = logits.copy()
        lm[i] -= eps
        num = (cross_entropy(lp, target, **kw)[0] - cross_entropy(lm, target, **kw)[0]) / (2 * eps)
        assert abs(num - grad[i]) < 1e-7
    if HAVE_TORCH:
        t = torch.nn.functional.cross_entropy(torch.from_numpy(logits[valid]),
                                              torch.from_numpy(target[valid]))
        assert abs(t.item() - value) < 1e-12


def test_loss_argument_errors(rng):
    pred = rng.standard_normal((T, B, O))
    with pytest.raises(ValueError, match="target"):
        mse_loss(pred, pred[:, :, :1])
    with pytest.raises(ValueError, match="lengths"):
        mse_loss(pred, pred, lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        mse_loss(pred[0], pred[0], lengths=np.array([1, 2, 3, 4]))  # per sequence
    with pytest.raises(ValueError, match="mask"):
        mse_loss(pred, pred, mask=np.ones((B, T), bool))
    with pytest.raises(ValueError, match="reduction"):
        mse_loss(pred, pred, reduction="avg")
    with pytest.raises(TypeError, match="target"):
        cross_entropy(pred, np.zeros((T, B)))
    with pytest.raises(ValueError, match=r"target must lie in \[0, C\)"):
        cross_entropy(pred, np.full((T, B), O))
    assert models.accuracy(pred, pred.argmax(-1)) == 1.0


# --------------------------------------------------------------------------
# Truncated BPTT
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cell,output,mode", [("lstm", "sequence", "lengths"),
                                              ("gru", "sequence", "mask"),
                                              ("rnn_tanh", "last", "plain"),
                                              ("lstm", "last", "lengths")])
def test_tbptt_without_cut_equals_unchunked_run(cell, output, mode, rng):
    m = RNNModel(cell, I, H, O, L, output=output, dtype=F64, seed=0)
    Tl = 11
    x = rng.standard_normal((Tl, B, I))
    kw = {}
    if mode == "lengths":
        kw["lengths"] = np.array([Tl, 0, 3, 8])
    elif mode == "mask":
        kw["mask"] = rng.random((Tl, B)) < 0.7
    target = rng.standard_normal((Tl, B, O) if output == "sequence" else (B, O))
    out, h_n, c_n, cache = m.forward(x, **kw)
    value, dout = mse_loss(out, target, **loss_kw(m, kw))
    grads, _ = m.backward(cache, dout)
    for chunk in (1, 4, 11, 50):
        r = models.truncated_bptt(m, x, target, mse_loss, chunk, cut=False, **kw)
        assert abs(r.loss - value) < 1e-12, (chunk, r.loss, value)
        assert_close("h_n", r.h_n, h_n, 1e-12)
        for k in grads:
            assert_close(k, r.grads[k], grads[k], 1e-10)


def test_tbptt_with_cut_stops_gradients_at_chunk_boundaries(rng):
    m = RNNModel("lstm", I, H, O, L, dtype=F64, seed=0)
    x = rng.standard_normal((8, B, I))
    target = rng.standard_normal((8, B, O))
    # by hand: two chunks of 4; the second starts from the first's final states,
    # taken as constants
    o1, h1, c1, k1 = m.forward(x[:4])
    l1, d1 = mse_loss(o1, target[:4])
    g1, _ = m.backward(k1, d1)
    o2, h2, c2, k2 = m.forward(x[4:], h1, c1)
    l2, d2 = mse_loss(o2, target[4:])
    g2, _ = m.backward(k2, d2)
    seen = []
    r = models.truncated_bptt(m, x, target, mse_loss, 4, on_chunk=seen.append)
    assert abs(r.loss - (l1 + l2) / 2) < 1e-12
    assert_close("h_n", r.h_n, h2, 0)
    assert_close("c_n", r.c_n, c2, 0)
    for k in g1:
        assert_close(k, r.grads[k], (g1[k] + g2[k]) / 2, 1e-12)
        assert_close(k, seen[0][k], g1[k], 0)  # on_chunk: each chunk's own mean loss
    full = models.truncated_bptt(m, x, target, mse_loss, 4, cut=False)
    assert not np.allclose(full.grads["rnn.weight_hh_l0"], r.grads["rnn.weight_hh_l0"])
    with pytest.raises(ValueError, match="unidirectional"):
        models.truncated_bptt(RNNModel("gru", I, H, O, bidirectional=True), x, target,
                              mse_loss, 4)


def test_tbptt_carries_state_like_one_long_run(rng):
    m = RNNModel("gru", I, H, O, dtype=F64, seed=0)
    x = rng.standard_normal((10, B, I))
    target = rng.standard_normal((10, B, O))
    r = models.truncated_bptt(m, x, target, mse_loss, 3)
    _, h_n, _, _ = m.forward(x, training=False)
    assert_close("h_n", r.h_n, h_n, 1e-12)


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, rng):
    m = RNNModel("lstm", I, H, O, L, bidirectional=True, output="last", seed=0)
    path = tmp_path / "model.npz"
    m.save(path)
    other = RNNModel("lstm", I, H, O, L, bidirectional=True, output="last", seed=1)
    held = other.params["rnn.weight_hh_l0"]
    assert not np.array_equal(held, m.params["rnn.weight_hh_l0"])
    other.load(path)
    assert other.params["rnn.weight_hh_l0"] is held  # loaded in place (optimizers keep it)
    for k in m.params:
        assert np.array_equal(other.params[k], m.params[k])
    again = models.load_model(path)
    assert again.config() == m.config()
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    assert np.array_equal(again.predict(x), m.predict(x))
    stack = RNN("gru", I, H, seed=0)
    stack.save(tmp_path / "stack")  # no suffix added
    assert np.array_equal(models.load_model(tmp_path / "stack").params["weight_hh_l0"],
                          stack.params["weight_hh_l0"])


@pytest.mark.parametrize("change,match", [
    (dict(cell="gru"), "holds a 'lstm' model, this model's cell is 'gru'"),
    (dict(hidden_size=5),
     r"hidden_size=4 vs 5.*shape mismatch: rnn.weight_ih_l0: file \(16, 3\), model \(20, 3\)"),
    (dict(num_layers=3), "missing in file: rnn.weight_ih_l2"),
    (dict(bidirectional=False), "not in model: rnn.weight_ih_l0_reverse"),
    (dict(output_size=3), "linear.weight: file"),
    (dict(input_size=2), "input_size=3 vs 2"),
])
def test_load_rejects_mismatched_files(tmp_path, change, match):
    cfg = dict(cell="lstm", input_size=I, hidden_size=H, output_size=O, num_layers=L,
               bidirectional=True)
    path = tmp_path / "m.npz"
    RNNModel(**cfg).save(path)
    cfg.update(change)
    other = RNNModel(**cfg)
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(ValueError, match=match):
        other.load(path)
    for k in before:  # nothing half-loaded
        assert np.array_equal(before[k], other.params[k])


def test_load_rejects_foreign_files(tmp_path):
    m = RNNModel("gru", I, H, O)
    plain = tmp_path / "plain.npz"
    np.savez(plain, **{k: v for k, v in m.params.items()})
    with pytest.raises(ValueError, match="not a fusedrnn model file"):
        m.load(plain)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a fusedrnn model file"):
        m.load(junk)
    with pytest.raises(FileNotFoundError):
        m.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="holds an RNNModel"):
        RNN("gru", I, H).load(_saved(m, tmp_path))
    assert zipfile.is_zipfile(_saved(m, tmp_path))


def _saved(model, tmp_path):
    p = tmp_path / "saved.npz"
    model.save(p)
    return p


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------

def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="cell must be one of"):
        RNN("lstmm", 2, 3)
    with pytest.raises(TypeError, match="hidden_size must be an int"):
        RNN("lstm", 2, 3.0)
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        RNN("lstm", 2, 3, 0)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        RNN("lstm", 2, 3, dropout=1.0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        RNN("lstm", 2, 3, dtype=np.int32)
    with pytest.raises(TypeError, match="backend"):
        RNN("lstm", 2, 3, backend=np)
    with pytest.raises(ValueError, match="output must be one of"):
        RNNModel("lstm", 2, 3, 1, output="first")
    with pytest.raises(TypeError, match="seed"):
        RNN("lstm", 2, 3, seed=1.5)


def test_forward_backward_errors_name_the_argument(rng):
    m = RNNModel("gru", I, H, O, L, bidirectional=True)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    with pytest.raises(TypeError, match="x has dtype float64, the model's dtype is float32"):
        m.forward(x.astype(F64))
    with pytest.raises(ValueError, match="input size I = 3"):
        m.forward(x[..., :2])
    with pytest.raises(ValueError, match=r"h0 must have shape \[L\*D, B, H\] = \(4, 4, 4\)"):
        m.forward(x, np.zeros((2, B, H), np.float32))
    with pytest.raises(ValueError, match="c0 is only used by cell 'lstm'"):
        m.forward(x, None, np.zeros((4, B, H), np.float32))
    with pytest.raises(ValueError, match="lengths"):
        m.forward(x, lengths=np.array([T + 1] * B))
    out, *_, cache = m.forward(x)
    with pytest.raises(ValueError, match="dout must have the shape of out"):
        m.backward(cache, out[:, :2])
    with pytest.raises(TypeError, match="this model's forward"):
        RNNModel("gru", I, H, O, L, bidirectional=True).backward(cache, out)
    with pytest.raises(TypeError, match="training=True"):
        m.backward(None, out)
    lin = Linear(3, 2)
    with pytest.raises(ValueError, match="F = 3"):
        lin.forward(np.zeros((2, 4), np.float32))

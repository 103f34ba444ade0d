"""fusedrnn.torch: the PyTorch drop-in (RNN, GRU, LSTM, convert, custom ops).

Parity with torch.nn on identical weights (load_state_dict from one into the other):
outputs, final states and the gradients of a random weighted sum of them with respect
to the input, h0/c0 and every parameter; float64 to 1e-10 and float32 to 1e-4, both
relative to the scale of torch's result (conftest.rel_err).

The option matrix is cell x num_layers 1-3 x bidirectional x batch_first x bias x
proj_size x input (padded / packed / unbatched) x h0 given or not x float32/float64.
Each pytest case is one (cell, input, dtype); inside it, by default, a pairwise
covering subset of the other options runs (every pair of values of any two options
appears at least once: 6 of the 48 combinations). FUSEDRNN_TORCH_MATRIX=full runs all
48 (1440 comparisons; about 80 s more on a 2-core machine). LSTM proj_size > 0 has its own
test over the same combinations.

Dropout: parity runs use dropout=0 (or eval mode) because fusedrnn draws its
inter-layer dropout mask with torch.nn.functional.dropout, not with torch.nn's
internal generator calls; test_dropout_* check what training-mode dropout does.
"""

import itertools
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.nn.utils.rnn import (  # noqa: E402
    PackedSequence, pack_padded_sequence, pad_packed_sequence)

import fusedrnn  # noqa: E402
import fusedrnn.torch as frnn  # noqa: E402
from fusedrnn import _torch_ops  # noqa: E402

from conftest import rel_err  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
#: fusedrnn cell -> (torch.nn class name, constructor kwargs)
CELLS = {"rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
         "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
         "gru": ("GRU", {}), "lstm": ("LSTM", {})}
INPUTS = ("padded", "packed", "unbatched")
T, B, I, H, P = 5, 3, 3, 4, 2  # steps, batch, input size, hidden size, projection size

#: the options varied inside one (cell, input, dtype) case
OPTIONS = {"num_layers": (1, 2, 3), "bidirectional": (False, True), "batch_first": (False, True),
           "bias": (True, False), "h0": (True, False)}


def pairwise(options):
    """A small list of option dicts in which every pair of values of any two options
    occurs (greedy covering array; deterministic)."""
    names = list(options)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in options[a] for vb in options[b]}
    rows = []
    all_rows = [dict(zip(names, vals)) for vals in itertools.product(*options.values())]
    while uncovered:
        def gain(r):
            return sum((a, r[a], b, r[b]) in uncovered for a, b in itertools.combinations(names, 2))
        best = max(all_rows, key=gain)
        rows.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return rows


FULL = os.environ.get("FUSEDRNN_TORCH_MATRIX", "") == "full"
COMBOS = ([dict(zip(OPTIONS, v)) for v in itertools.product(*OPTIONS.values())] if FULL
          else pairwise(OPTIONS))


def make_pair(cell, dtype, proj_size=0, **kw):
    """(torch.nn module, fusedrnn.torch module) with identical weights."""
    name, extra = CELLS[cell]
    kw = dict(kw, **extra, dtype=dtype)
    if proj_size:
        kw["proj_size"] = proj_size
    ref = getattr(torch.nn, name)(I, H, **kw)
    ours = getattr(frnn, name)(I, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def run(module, cell, x, hx, input_kind, lengths, batch_first):
    """Forward; returns (output as a padded tensor, h_n, c_n or None)."""
    if input_kind == "packed":
        xin = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    else:
        xin = x
    out, state = module(xin) if hx is None else module(xin, hx)
    if input_kind == "packed":
        assert isinstance(out, PackedSequence)
        out, out_lengths = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        assert torch.equal(out_lengths, lengths)
    h_n, c_n = state if cell == "lstm" else (state, None)
    return out, h_n, c_n


def compare(cell, dtype, input_kind, num_layers=1, bidirectional=False, batch_first=False,
            bias=True, h0=True, proj_size=0, seed=0, device="cpu"):
    """Run both modules on the same problem; assert outputs, states and gradients agree.

    device: where both modules and all tensors live (random values are drawn on the CPU
    and moved, so every device sees the same problem)."""
    gen = torch.Generator().manual_seed(seed)
    ref, ours = make_pair(cell, dtype, proj_size, num_layers=num_layers,
                          bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    ref, ours = ref.to(device), ours.to(device)
    D = 2 if bidirectional else 1
    Hout = proj_size or H
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device)  # noqa: E731
    if input_kind == "unbatched":
        x = randn(T, I)
        hshape, cshape = (num_layers * D, Hout), (num_layers * D, H)
    else:
        x = randn(B, T, I) if batch_first else randn(T, B, I)
        hshape, cshape = (num_layers * D, B, Hout), (num_layers * D, B, H)
    lengths = torch.tensor([T, 2, 4][:B])  # unsorted, one full row
    hx = None
    if h0:
        hx = (randn(*hshape), randn(*cshape)) if cell == "lstm" else randn(*hshape)

    results = []
    for m in (ref, ours):
        xg = x.clone().requires_grad_(True)
        hxg = None
        if hx is not None:
            hxg = tuple(h.clone().requires_grad_(True) for h in hx) if cell == "lstm" \
                else hx.clone().requires_grad_(True)
        out, h_n, c_n = run(m, cell, xg, hxg, input_kind, lengths, batch_first)
        g = torch.Generator().manual_seed(seed + 1)
        w = lambda t: torch.randn(t.shape, generator=g, dtype=dtype).to(device)  # noqa: E731
        loss = (out * w(out)).sum() + (h_n * w(h_n)).sum()
        if c_n is not None:
            loss = loss + (c_n * w(c_n)).sum()
        inputs = [xg] + list(m.parameters())
        if hxg is not None:
            inputs += list(hxg) if cell == "lstm" else [hxg]
        grads = torch.autograd.grad(loss, inputs)
        named = {"y": out, "h_n": h_n, "c_n": c_n, "dx": grads[0]}
        names = [n for n, _ in m.named_parameters()]
        named.update({f"d{n}": gr for n, gr in zip(names, grads[1:1 + len(names)])})
        named.update({f"dhx{i}": gr for i, gr in enumerate(grads[1 + len(names):])})
        results.append(named)
    want, got = results
    assert want.keys() == got.keys()
    tol = TOL[dtype]
    worst = 0.0
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
            continue
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert got[k].device == want[k].device, (k, got[k].device, want[k].device)
        e = rel_err(got[k].detach().cpu().numpy(), want[k].detach().cpu().numpy())
        worst = max(worst, e)
        assert e <= tol, f"{k}: relative error {e:.3e} > {tol:.0e}"
    return worst


# --------------------------------------------------------------------------
# Parity with torch.nn
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("input_kind", INPUTS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_parity_with_torch_nn(cell, input_kind, dtype):
    worst = 0.0
    for i, combo in enumerate(COMBOS):
        try:
            worst = max(worst, compare(cell, dtype, input_kind, seed=i, **combo))
        except AssertionError as e:
            raise AssertionError(f"{cell} {input_kind} {dtype} {combo}: {e}") from None
    print(f"{cell} {input_kind} {dtype}: {len(COMBOS)} option combinations, "
          f"worst relative error {worst:.2e}")


@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", P)])
def test_input_gradients_only_where_wanted(cell, proj, monkeypatch):
    """Backward asks the kernel for the gradients of x, h0 and c0 only where autograd
    wants them (fusedrnn._backward's need_x, need_h0, need_c0): not for data that does
    not require grad nor for a detached or absent initial state, but for layer 1's input
    (layer 0's output) and for whichever of h0 and c0 requires grad. The gradients that
    are computed match torch.nn's (2 layers, bidirectional, padded and packed)."""
    needs = []
    real = fusedrnn._backward

    def spy(cache, dy, dh_n=None, dc_n=None, need_x=True, need_h0=True, need_c0=True):
        needs.append((need_x, need_h0, need_c0))
        return real(cache, dy, dh_n, dc_n, need_x, need_h0, need_c0)

    monkeypatch.setattr(fusedrnn, "_backward", spy)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([T, 2, 4])
    Hout = proj or H
    # which of (h0, c0) require grad; None: no initial state
    for state in (None, (False, False), (True, False), (False, True)):
        if cell != "lstm" and state is not None and state[1]:
            continue
        for kind in ("padded", "packed"):
            ref, ours = make_pair(cell, torch.float64, proj, num_layers=2, bidirectional=True)
            x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
            hx = None
            if state is not None:
                h = torch.randn(4, B, Hout, generator=gen, dtype=torch.float64)
                c = torch.randn(4, B, H, generator=gen, dtype=torch.float64)
            results = []
            for m in (ref, ours):
                if state is not None:
                    hx = (h.clone().requires_grad_(state[0]), c.clone().requires_grad_(state[1]))
                    hx = hx if cell == "lstm" else hx[0]
                out, h_n, _ = run(m, cell, x, hx, kind, lengths, False)
                wanted = list(m.parameters())
                if state is not None:
                    wanted += [t for t in (hx if cell == "lstm" else (hx,)) if t.requires_grad]
                results.append(torch.autograd.grad((out * out).sum() + h_n.sum(), wanted))
            needs_x = [n[0] for n in needs]
            assert needs_x == [True, True, False, False], needs_x  # layer 1, then layer 0
            want_h0 = state is not None and state[0]
            want_c0 = state is not None and state[1]
            assert all(n[1:] == (want_h0, want_c0) for n in needs), (state, needs)
            needs.clear()
            for a, b in zip(*results):
                assert rel_err(b.numpy(), a.numpy()) <= TOL[torch.float64], (state, kind)


@pytest.mark.parametrize("input_kind", INPUTS)
def test_parity_lstm_projection(input_kind):
    for i, combo in enumerate(COMBOS):
        for dtype in (torch.float32, torch.float64):
            compare("lstm", dtype, input_kind, proj_size=P, seed=i, **combo)


def test_packed_sorted_and_unsorted_hidden_order():
    """enforce_sorted=True (no sorted_indices) and pack_sequence; h0 follows the user's order."""
    ref, ours = make_pair("gru", torch.float64, num_layers=2, bidirectional=True)
    seqs = [torch.randn(n, I, dtype=torch.float64) for n in (5, 4, 2)]
    h0 = torch.randn(4, 3, H, dtype=torch.float64)
    for enforce_sorted in (True, False):
        order = [0, 1, 2] if enforce_sorted else [1, 2, 0]
        packed = torch.nn.utils.rnn.pack_sequence([seqs[k] for k in order],
                                                  enforce_sorted=enforce_sorted)
        (ya, ha), (yb, hb) = ref(packed, h0), ours(packed, h0)
        assert torch.equal(ya.batch_sizes, yb.batch_sizes)
        assert (ya.sorted_indices is None) == (yb.sorted_indices is None)
        assert rel_err(yb.data.detach().numpy(), ya.data.detach().numpy()) <= 1e-10
        assert rel_err(hb.detach().numpy(), ha.detach().numpy()) <= 1e-10


def test_same_parameters_and_initialisation():
    for cell, (name, extra) in CELLS.items():
        kw = dict(extra, num_layers=2, bidirectional=True)
        torch.manual_seed(3)
        ref = getattr(torch.nn, name)(I, H, **kw)
        torch.manual_seed(3)
        ours = getattr(frnn, name)(I, H, **kw)
        ref_params, our_params = list(ref.named_parameters()), list(ours.named_parameters())
        assert [n for n, _ in our_params] == [n for n, _ in ref_params]
        for (n, a), (_, b) in zip(ref_params, our_params):
            assert torch.equal(a, b), n
        assert repr(ours) == repr(ref)
        # strict loading in both directions
        ref.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert not isinstance(ours, (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM))
        assert isinstance(ours, torch.nn.RNNBase)


def test_no_bias_parameters():
    ref, ours = make_pair("lstm", torch.float32, bias=False, num_layers=2)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert not any("bias" in n for n, _ in ours.named_parameters())


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------

def test_dropout_eval_mode_matches_torch():
    ref, ours = make_pair("lstm", torch.float64, num_layers=3, dropout=0.5)
    ref.eval(), ours.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    (ya, _), (yb, _) = ref(x), ours(x)
    assert rel_err(yb.detach().numpy(), ya.detach().numpy()) <= 1e-10


def test_dropout_training_mode_drops_between_layers():
    """Layer 2 sees dropout(layer 1's output): ~p zeros, the rest scaled by 1/(1-p);
    reproducible with torch.manual_seed; no dropout after the last layer."""
    p = 0.4
    ours = frnn.GRU(I, H, num_layers=2, dropout=p, dtype=torch.float64)
    ours.train()
    x = torch.randn(40, 25, I, dtype=torch.float64)
    torch.manual_seed(123)
    y, h_n = ours(x)
    # the same computation by hand, from single-layer modules with the same weights
    l0, l1 = frnn.GRU(I, H, dtype=torch.float64), frnn.GRU(H, H, dtype=torch.float64)
    sd = ours.state_dict()
    l0.load_state_dict({k: v for k, v in sd.items() if k.endswith("_l0")})
    l1.load_state_dict({k.replace("_l1", "_l0"): v for k, v in sd.items() if k.endswith("_l1")})
    y0, h0 = l0(x)
    torch.manual_seed(123)
    mask_src = torch.nn.functional.dropout(torch.ones_like(y0), p=p, training=True)
    zeros = float((mask_src == 0).double().mean())
    print(f"dropped fraction {zeros:.3f} (p = {p})")
    assert abs(zeros - p) < 0.03
    assert torch.allclose(mask_src[mask_src != 0], torch.tensor(1 / (1 - p), dtype=torch.float64))
    y1, h1 = l1(y0 * mask_src)
    assert rel_err(y.detach().numpy(), y1.detach().numpy()) <= 1e-12
    assert rel_err(h_n[0].detach().numpy(), h0[0].detach().numpy()) <= 1e-12
    assert rel_err(h_n[1].detach().numpy(), h1[0].detach().numpy()) <= 1e-12
    # gradients flow through the dropout mask
    y.sum().backward()
    assert ours.weight_ih_l0.grad is not None and torch.isfinite(ours.weight_ih_l0.grad).all()


def test_dropout_single_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout"):
        frnn.LSTM(I, H, dropout=0.2)


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck(cell):
    """torch.autograd.gradcheck in float64, bidirectional 2-layer, packed and padded
    (fast_mode: checks random projections of the Jacobian; the parity tests compare
    every gradient with torch.nn's)."""
    name, extra = CELLS[cell]
    m = getattr(frnn, name)(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    with torch.no_grad():  # keep relu away from its kink
        for prm in m.parameters():
            prm.mul_(0.7)
    params = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])

    def f(x, h0, c0, *ps):
        fn = lambda *a: torch.func.functional_call(m, dict(zip(names, ps)), a)  # noqa: E731
        outs = []
        for packed in (False, True):
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            out, st = fn(inp, (h0, c0)) if cell == "lstm" else fn(inp, h0)
            outs += [out.data if packed else out] + (list(st) if cell == "lstm" else [st])
        return tuple(outs)

    args = (x, h0, c0 if cell == "lstm" else c0.detach(), *params)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=True)


def test_parametrized_and_replaced_weights():
    """A weight under torch.nn.utils.parametrize (not in the module's _parameters: read
    through its attribute) and a Parameter replaced by assignment are what the layers
    use, as in torch.nn."""
    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    ref = torch.nn.GRU(I, H, dtype=torch.float64)
    m = frnn.convert(torch.nn.GRU(I, H, dtype=torch.float64))
    m.load_state_dict(ref.state_dict())
    for mod in (ref, m):
        torch.nn.utils.parametrize.register_parametrization(mod, "weight_hh_l0", Double())
        mod.bias_ih_l0 = torch.nn.Parameter(torch.full((3 * H,), 0.25, dtype=torch.float64))
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, h = m(x)
    out_ref, h_ref = ref(x)
    assert rel_err(out.detach().numpy(), out_ref.detach().numpy()) <= TOL[torch.float64]
    out.sum().backward()
    out_ref.sum().backward()
    for name in ("parametrizations.weight_hh_l0.original", "bias_ih_l0"):
        g, g_ref = m.get_parameter(name).grad, ref.get_parameter(name).grad
        assert rel_err(g.numpy(), g_ref.numpy()) <= TOL[torch.float64], name


def test_double_backward_raises_clear_error():
    m = frnn.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # an ordinary backward still works afterwards, and twice with retain_graph
    y, _ = m(x)
    g1, = torch.autograd.grad(y.sum(), x, retain_graph=True)
    g2, = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g1, g2)


def test_caches_are_freed_and_not_kept_without_grad():
    import gc
    gc.collect()
    base = _torch_ops.live_caches()
    m = frnn.GRU(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I)
    y, _ = m(x)
    assert _torch_ops.live_caches() == base + 4  # one per layer and direction
    y.sum().backward()
    del y
    gc.collect()
    assert _torch_ops.live_caches() == base
    with torch.no_grad():
        m(x)
    x2 = torch.randn(T, B, I)
    for prm in m.parameters():
        prm.requires_grad_(False)
    m(x2)  # nothing requires grad: no cache either
    assert _torch_ops.live_caches() == base


def test_grad_wrt_input_only_and_states_only():
    m = frnn.LSTM(I, H, dtype=torch.float64).requires_grad_(False)
    ref = torch.nn.LSTM(I, H, dtype=torch.float64).requires_grad_(False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    ga = torch.autograd.grad(m(x, (h0, c0))[1][1].sum(), [h0, c0])
    gb = torch.autograd.grad(ref(x, (h0, c0))[1][1].sum(), [h0, c0])
    for a, b in zip(ga, gb):
        assert rel_err(a.numpy(), b.numpy()) <= 1e-10


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake tensor, AOT dispatch."""
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    args = (r(T, B, I), r(4 * H, I), r(4 * H, H), r(4 * H), None, r(B, H), r(B, H), None,
            torch.tensor([T, 2, 0]), "lstm", True, False, True)
    result = torch.library.opcheck(torch.ops.fusedrnn.layer_forward.default, args)
    print(result)
    assert set(result.values()) == {"SUCCESS"}


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------

class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = frnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = frnn.GRU(2 * H, H)
        self.rnn = frnn.RNN(H, H, nonlinearity="relu", bias=False)
        self.head = torch.nn.Linear(H, 1)

    def forward(self, x, h0):
        y, (h, c) = self.lstm(x)
        z, hg = self.gru(y.transpose(0, 1), h0)
        w, hr = self.rnn(z)
        return self.head(w).sum() + h.sum() + c.sum() + hg.sum() + hr.sum()


def _compiled_matches_eager(model, args, backend, tol=1e-6, **compile_kw):
    compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kw)
    params = list(model.parameters())
    host = lambda t: t.detach().cpu().numpy()  # noqa: E731
    for a in args:
        inputs = [t for t in a if t.requires_grad]
        want = model(*a)
        gw = torch.autograd.grad(want, inputs + params)
        got = compiled(*a)
        gg = torch.autograd.grad(got, inputs + params)
        assert got.device == want.device
        assert rel_err(host(got), host(want)) <= tol
        for u, v in zip(gg, gw):
            assert u.device == v.device
            assert rel_err(host(u), host(v)) <= tol
        with torch.no_grad():
            assert rel_err(host(compiled(*a)), host(want)) <= tol


def test_compile_fullgraph_aot_eager():
    """Dynamo traces the modules without graph breaks (fullgraph) and AOTAutograd uses
    the custom ops' fake implementations and autograd formulas."""
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(B, T, I, requires_grad=True)
    h0 = torch.randn(1, B, H, requires_grad=True)
    _compiled_matches_eager(model, [(x, h0)], "aot_eager")


def test_compile_fullgraph_dynamic_shapes():
    torch.manual_seed(1)
    model = _Model()
    args = [(torch.randn(b, t, I, requires_grad=True), torch.randn(1, b, H)) for b, t in
            ((2, 3), (4, 6))]
    _compiled_matches_eager(model, args, "aot_eager", dynamic=True)


def test_compile_fullgraph_inductor():
    """The default backend (inductor) on a small GRU, forward and backward. The graph
    holds little besides the custom ops, so inductor has (almost) no C++ to compile."""
    torch._dynamo.reset()
    m = frnn.GRU(I, H)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(T, B, I, requires_grad=True)
    h0 = torch.randn(1, B, H, requires_grad=True)
    gy, gh = torch.randn(T, B, H), torch.randn(1, B, H)
    inputs = [x, h0] + list(m.parameters())
    results = []
    for fn in (m, compiled):
        y, h = fn(x, h0)
        results.append([y, h, *torch.autograd.grad((y, h), inputs, (gy, gh))])
    for a, b in zip(*results):
        assert rel_err(b.detach().numpy(), a.detach().numpy()) <= 1e-6


def test_compile_packed_input_with_sorted_indices():
    """A PackedSequence built outside the compiled function (enforce_sorted=False)."""
    m = frnn.LSTM(I, H, bidirectional=True, dtype=torch.float64)

    def f(packed):
        out, (h, c) = m(packed)
        return out.data, h, c

    x = torch.randn(T, B, I, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([T, 2, 4]), enforce_sorted=False)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(packed), f(packed)):
        assert rel_err(a.detach().numpy(), b.detach().numpy()) <= 1e-12


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------

def test_convert_replaces_modules_and_keeps_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.ModuleDict({"enc": torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)}),
        torch.nn.ModuleList([torch.nn.GRU(I, H, batch_first=True),
                             torch.nn.RNN(I, H, nonlinearity="relu", bias=False)]),
    )
    model.eval()
    x = torch.randn(T, B, I)
    before = [model[0]["enc"](x), model[1][0](x), model[1][1](x)]
    params_before = list(model.parameters())
    out = frnn.convert(model)
    assert out is model
    assert type(model[0]["enc"]) is frnn.LSTM
    assert type(model[1][0]) is frnn.GRU
    assert type(model[1][1]) is frnn.RNN and model[1][1].nonlinearity == "relu"
    assert model[1][0].batch_first and not model[1][1].bias
    assert not model[0]["enc"].training  # training mode kept
    params_after = list(model.parameters())
    assert len(params_after) == len(params_before)
    assert all(a is b for a, b in zip(params_after, params_before))  # the same Parameters
    after = [model[0]["enc"](x), model[1][0](x), model[1][1](x)]
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for a, b in zip(before, after):
        for u, v in zip(flat(a), flat(b)):
            assert rel_err(v.detach().numpy(), u.detach().numpy()) <= 1e-4


def test_convert_module_itself_and_optimizer_keeps_working():
    lstm = torch.nn.LSTM(I, H)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
    new = frnn.convert(lstm)
    assert type(new) is frnn.LSTM
    before = new.weight_ih_l0.detach().clone()
    new(torch.randn(T, B, I))[0].sum().backward()
    opt.step()
    assert not torch.equal(before, lstm.weight_ih_l0)  # the optimizer updated the shared weight
    assert new.weight_ih_l0 is lstm.weight_ih_l0


def test_convert_leaves_subclasses():
    class MyLSTM(torch.nn.LSTM):
        pass

    model = torch.nn.Sequential(MyLSTM(I, H))
    frnn.convert(model)
    assert type(model[0]) is MyLSTM


def test_convert_projected_lstm():
    model = torch.nn.Sequential(torch.nn.LSTM(I, H, proj_size=2, num_layers=2))
    x = torch.randn(T, B, I)
    want = model[0](x)[0]
    frnn.convert(model)
    assert type(model[0]) is frnn.LSTM and model[0].proj_size == 2
    assert rel_err(model[0](x)[0].detach().numpy(), want.detach().numpy()) <= 1e-4


# --------------------------------------------------------------------------
# Errors: the same exception types as torch.nn
# --------------------------------------------------------------------------

CTOR_CASES = [
    ("LSTM", (I, 0), {}),
    ("LSTM", (I, -1), {}),
    ("GRU", (0, H), {}),
    ("GRU", (I, 2.5), {}),
    ("GRU", ("3", H), {}),
    ("RNN", (I, H), {"bias": 1}),
    ("RNN", (I, H), {"batch_first": "yes"}),
    ("LSTM", (I, H), {"num_layers": 0}),
    ("LSTM", (I, H), {"dropout": 1.5}),
    ("LSTM", (I, H), {"dropout": True}),
    ("RNN", (I, H), {"nonlinearity": "sigmoid"}),
    ("RNN", (I, H, 1, "gelu"), {}),
    ("RNN", (I, H), {"proj_size": 2}),
    ("GRU", (I, H), {"proj_size": 2}),
    ("LSTM", (I, H), {"proj_size": -1}),
    ("LSTM", (I, H), {"proj_size": H}),
]


@pytest.mark.parametrize("name,args,kwargs", CTOR_CASES)
def test_constructor_errors_match_torch(name, args, kwargs):
    with pytest.raises(Exception) as want:
        getattr(torch.nn, name)(*args, **kwargs)
    with pytest.raises(Exception) as got:
        getattr(frnn, name)(*args, **kwargs)
    print(f"torch.nn: {want.type.__name__}: {want.value}\n"
          f"fusedrnn: {got.type.__name__}: {got.value}")
    assert got.type is want.type


def _forward_cases():
    x = torch.randn(T, B, I)
    return [
        ("dtype", "LSTM", x.double(), None),
        ("4-D input", "GRU", torch.randn(1, T, B, I), None),
        ("1-D input", "RNN", torch.randn(I), None),
        ("input size", "LSTM", torch.randn(T, B, I + 1), None),
        ("h0 shape", "GRU", x, torch.randn(1, B + 1, H)),
        ("h0 rank", "RNN", x, torch.randn(B, H)),
        ("unbatched h0 rank", "GRU", torch.randn(T, I), torch.randn(1, 1, H)),
        ("lstm h0 shape", "LSTM", x, (torch.randn(1, B, H), torch.randn(2, B, H))),
        ("lstm h0 rank", "LSTM", x, (torch.randn(B, H), torch.randn(B, H))),
        ("empty sequence", "GRU", torch.randn(0, B, I), None),
    ]


@pytest.mark.parametrize("case", _forward_cases(), ids=lambda c: c[0])
def test_forward_errors_match_torch(case):
    _, name, x, hx = case
    ref, ours = getattr(torch.nn, name)(I, H), getattr(frnn, name)(I, H)
    with pytest.raises(Exception) as want:
        ref(x) if hx is None else ref(x, hx)
    with pytest.raises(Exception) as got:
        ours(x) if hx is None else ours(x, hx)
    print(f"torch.nn: {want.type.__name__}: {want.value}\n"
          f"fusedrnn: {got.type.__name__}: {got.value}")
    assert got.type is want.type


def test_packed_sorted_input_checks_hx_batch_size():
    """enforce_sorted=True (sorted_indices None): the batch comes from batch_sizes[0], so an
    hx with more rows raises as in torch.nn (it used to set the batch size and run).
    Compiled, the batch comes from hx (no data-dependent graph break)."""
    ref, ours = make_pair("gru", torch.float64)
    packed = pack_padded_sequence(torch.randn(T, 2, I, dtype=torch.float64), torch.tensor([T, 3]))
    bad = torch.randn(1, 3, H, dtype=torch.float64)
    for m in (ref, ours):
        with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 4\)"):
            m(packed, bad)
    h0 = torch.randn(1, 2, H, dtype=torch.float64)
    compiled = torch.compile(lambda p, h: ours(p, h)[1], fullgraph=True, backend="aot_eager")
    got, want = compiled(packed, h0), ref(packed, h0)[1]
    assert rel_err(got.detach().numpy(), want.detach().numpy()) <= 1e-10


def test_hidden_dtype_mismatch_is_a_clear_error():
    m = frnn.GRU(I, H)
    with pytest.raises(RuntimeError, match="dtype"):
        m(torch.randn(T, B, I), torch.randn(1, B, H, dtype=torch.float64))


def test_unsupported_dtype_is_a_clear_error():
    m = frnn.LSTM(I, H, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 and float64"):
        m(torch.randn(T, B, I, dtype=torch.bfloat16))


def test_cuda_tensors_without_cuda_backend_name_the_fix(monkeypatch):
    """CUDA tensors need the CUDA extension and a device: otherwise a RuntimeError that
    quotes fusedrnn.cuda_status() and names the fixes; with both, check_device passes."""
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), is_cpu=False)
    status = "fusedrnn was built without its CUDA extension (test)"
    monkeypatch.setattr(fusedrnn, "cuda_available", lambda: False)
    monkeypatch.setattr(fusedrnn, "cuda_status", lambda: status)
    with pytest.raises(RuntimeError, match="CUDA backend cannot run it") as e:
        _torch_ops.check_device(fake, "x")
    msg = str(e.value)
    for part in (status, "cuda:0", "FUSEDRNN_CUDA=ON", "fusedrnn.cuda_status()", "cpu()",
                 "torch.nn"):
        assert part in msg, part
    monkeypatch.setattr(fusedrnn, "cuda_available", lambda: True)
    _torch_ops.check_device(fake, "x")  # dispatched to the CUDA backend, no error
    with pytest.raises(RuntimeError, match="CPU tensors .* and CUDA tensors"):
        _torch_ops.check_device(
            types.SimpleNamespace(device=torch.device("meta"), is_cpu=False), "x")


def test_meta_module_runs_shapes_only():
    """On the meta device the fake implementations give shapes (no kernels run)."""
    m = frnn.LSTM(I, H, num_layers=2, bidirectional=True, device="meta")
    y, h, c = m._run_stack(torch.empty(T, B, I, device="meta"), None, None, None, False)
    assert y.shape == (T, B, 2 * H) and h.shape == (4, B, H) and c.shape == (4, B, H)


def _run_module(m, x, h0):
    """Outputs and gradients (of everything) of one forward+backward of module m."""
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    h0 = tuple(h.clone().requires_grad_(True) for h in h0)
    y, hidden = m(x, h0 if len(h0) == 2 else h0[0])
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + sum(
        (h * h).sum() for h in hidden)
    loss.backward()
    return [y, *hidden, x.grad, *(h.grad for h in h0), *(p.grad for p in m.parameters())]


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
def test_eager_fast_path_equals_the_operator(cell, monkeypatch):
    """In plain eager mode run_layer skips the operator dispatch (the implementation
    directly, or an autograd.Function with the operator's formula); results and
    gradients are bitwise those of the operator, and the operator is not called."""
    torch.manual_seed(0)
    m = getattr(frnn, cell)(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I)
    h0 = tuple(torch.randn(4, B, H) for _ in range(2 if cell == "LSTM" else 1))
    calls = []
    op = torch.ops.fusedrnn.layer_forward
    monkeypatch.setattr(torch.ops.fusedrnn, "layer_forward",
                        lambda *a: calls.append(1) or op(*a))
    fast = _run_module(m, x, h0)
    with torch.no_grad():
        fast_inference = m(x)[0]
    assert calls == []
    monkeypatch.setattr(_torch_ops, "_plain_eager", lambda tensors: False)
    slow = _run_module(m, x, h0)
    with torch.no_grad():
        slow_inference = m(x)[0]
    assert len(calls) == 2 * 4  # two passes of 2 layers x 2 directions
    for a, b in zip(fast + [fast_inference], slow + [slow_inference]):
        assert torch.equal(a, b)


INFERENCE_CASES = [  # (module, input kind, constructor options, h0 given)
    ("RNN", "padded", dict(num_layers=3, bidirectional=True), True),
    ("RNN", "unbatched", dict(nonlinearity="relu", bias=False), True),
    ("GRU", "packed", dict(num_layers=2, bidirectional=True, batch_first=True), True),
    ("GRU", "padded", dict(batch_first=True), False),
    ("LSTM", "padded", dict(num_layers=2, bidirectional=True, proj_size=P), True),
    ("LSTM", "packed", dict(num_layers=2), False),
    ("LSTM", "unbatched", dict(bidirectional=True), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name, input_kind, options, given", INFERENCE_CASES)
def test_inference_stack_equals_run_layer(name, input_kind, options, given, dtype,
                                          monkeypatch):
    """A call that nothing differentiates runs the module's whole stack on NumPy views
    (_torch_ops.run_stack_inference); outputs and states are bitwise those of the
    per-layer path (run_layer), for every option and input kind; with anything that
    requires grad under grad mode, the call keeps its cache (per-layer path)."""
    torch.manual_seed(0)
    m = getattr(frnn, name)(I, H, dtype=dtype, **options)
    D = 2 if m.bidirectional else 1
    Pout = m.proj_size or H
    batch = input_kind != "unbatched"
    x = torch.randn(*((B, T, I) if m.batch_first else (T, B, I)) if batch else (T, I),
                    dtype=dtype)
    lengths = torch.tensor([T, 2, 4])
    xin = x if input_kind != "packed" else pack_padded_sequence(
        x, lengths, batch_first=m.batch_first, enforce_sorted=False)
    lead = (m.num_layers * D, B) if batch else (m.num_layers * D,)
    hx = None
    if given:
        h0 = torch.randn(*lead, Pout, dtype=dtype)
        hx = (h0, torch.randn(*lead, H, dtype=dtype)) if name == "LSTM" else h0

    def call():
        out, state = m(xin, hx)
        out = out.data if isinstance(out, PackedSequence) else out
        return [out, *(state if isinstance(state, tuple) else (state,))]

    used = []
    real = _torch_ops.run_stack_inference
    monkeypatch.setattr(frnn, "run_stack_inference",
                        lambda *a: used.append(1) or real(*a))
    with torch.no_grad():
        fast = call()
    m.requires_grad_(False)
    frozen = call()  # grad mode on, nothing requires grad
    assert len(used) == 2
    monkeypatch.setattr(frnn, "direct_inference", lambda tensors: False)
    slow = call()
    assert len(used) == 2
    for a, b, c in zip(fast, frozen, slow):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert torch.equal(a, c) and torch.equal(b, c)
    m.requires_grad_(True)
    monkeypatch.setattr(frnn, "direct_inference", _torch_ops.direct_inference)
    base = _torch_ops.live_caches()
    training = call()  # grad mode, weights require grad: a cache per layer and direction
    assert len(used) == 2 and _torch_ops.live_caches() == base + m.num_layers * D
    for a, c in zip(training, slow):
        assert torch.equal(a.detach(), c)


def test_jit_trace_records_the_operator():
    """torch.jit.trace records operators: the traced module must call fusedrnn's, not
    replay the traced input's outputs as constants."""
    torch.manual_seed(0)
    m = frnn.GRU(I, H)
    x1, x2 = torch.randn(T, B, I), torch.randn(T, B, I)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        traced = torch.jit.trace(m, x1)
        assert "fusedrnn::layer_forward" in str(traced.graph)
        assert torch.equal(traced(x2)[0], m(x2)[0])


def test_profiler_and_activation_checkpointing():
    """The profiler still names fusedrnn's operators; torch.utils.checkpoint (which
    recomputes the forward during backward) gives the plain gradients."""
    torch.manual_seed(0)
    m = frnn.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    with torch.profiler.profile() as prof:
        m(x)[0].sum().backward()
    names = {e.name for e in prof.events()}
    assert "fusedrnn::layer_forward" in names and "fusedrnn::layer_backward" in names
    plain = torch.autograd.grad(m(x)[0].sum(), [x, *m.parameters()])
    ckpt = torch.utils.checkpoint.checkpoint(lambda v: m(v)[0], x, use_reentrant=False)
    recomputed = torch.autograd.grad(ckpt.sum(), [x, *m.parameters()])
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_ad_is_refused(grad):
    """Dual inputs raise (with grad mode off they used to come back without tangents)."""
    import torch.autograd.forward_ad as fwAD
    m = frnn.GRU(I, H)
    x = torch.randn(T, B, I)
    with fwAD.dual_level(), torch.set_grad_enabled(grad):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            m(fwAD.make_dual(x, torch.randn_like(x)))
        m(x)  # no tangent anywhere: runs


def test_dispatch_modes_still_see_the_operator():
    """Under a TorchDispatchMode (or torch.compile, or on meta tensors) the operator runs,
    so modes and tracers see fusedrnn.layer_forward as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    m = frnn.GRU(I, H)
    x = torch.randn(T, B, I)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), Log() as log:
            m(x)
        assert any("fusedrnn.layer_forward" in o for o in log.ops), log.ops


# --------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------

def test_import_fusedrnn_does_not_import_the_adapter():
    code = ("import sys, fusedrnn; "
            "assert 'torch' not in sys.modules and 'fusedrnn.torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_bench_provider_matches_torch_nn():
    """The provider ``python -m fusedrnn bench`` times for fusedrnn.torch."""
    from fusedrnn import _bench

    rng = np.random.default_rng(0)
    for cell, use_lengths, pass_ in (("lstm", False, "forward+backward"), ("gru", True, "forward"),
                                     ("rnn_tanh", True, "forward+backward")):
        G = fusedrnn.CELLS[cell]
        u = lambda *s: rng.uniform(-0.5, 0.5, size=s).astype(np.float64)  # noqa: E731
        prob = types.SimpleNamespace(x=u(T, B, I), w_ih=u(G * H, I), w_hh=u(G * H, H),
                                     b_ih=u(G * H), b_hh=u(G * H), dy=u(T, B, H),
                                     lengths=np.array([T, 2, 4]) if use_lengths else None)
        case = types.SimpleNamespace(cell=cell, T=T, B=B, I=I, H=H, pass_=pass_)
        call, outputs = _bench.bind_torch(torch, case, prob, frnn)
        got = outputs(call())
        y, h_n, c_n, cache = fusedrnn.forward(cell, prob.x, prob.w_ih, prob.w_hh, prob.b_ih,
                                              prob.b_hh, lengths=prob.lengths)
        assert rel_err(got["y"], y) <= 1e-12 and rel_err(got["h_n"], h_n) <= 1e-12
        if pass_ != "forward":
            grads = fusedrnn.backward(cache, prob.dy)
            assert rel_err(got["dx"], grads["x"]) <= 1e-12
            assert rel_err(got["dw_hh"], grads["w_hh"]) <= 1e-12


@pytest.mark.parametrize("checkpoint", [True, 3])
def test_checkpoint_attribute_gives_the_same_gradients(checkpoint, device="cpu",
                                                        dtype=torch.float64, tol=1e-12):
    torch.manual_seed(0)
    full = frnn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=dtype, device=device)
    ck = frnn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=dtype, device=device)
    ck.load_state_dict(full.state_dict())
    ck.checkpoint = checkpoint
    x = torch.randn(9, 4, 3, dtype=dtype, device=device)
    results = []
    for m in (full, ck):
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        loss = (y * w).sum() + h.sum()
        results.append((y.detach(), torch.autograd.grad(loss, [xi] + list(m.parameters()))))
    if device == "cpu":
        assert torch.equal(results[0][0], results[1][0])
    else:  # (on CUDA the full cache may come from the persistent kernels, other sums)
        assert rel_err(results[1][0].cpu().numpy(), results[0][0].cpu().numpy()) <= tol
    for a, b in zip(results[0][1], results[1][1]):
        assert rel_err(b.cpu().numpy(), a.cpu().numpy()) <= tol


def test_checkpoint_attribute_is_checked():
    m = frnn.GRU(3, 4)
    m.checkpoint = 0
    with pytest.raises(ValueError, match="checkpoint"):
        m(torch.randn(5, 2, 3))


# --------------------------------------------------------------------------
# CUDA tensors (fusedrnn's CUDA backend)
# --------------------------------------------------------------------------
#
# Host-side tests (run everywhere) cover the device plumbing that needs no GPU: the
# checks and errors for CUDA-only situations (on fake CUDA tensors), the fake
# implementations' devices and dtypes, packed input keeping its lengths on the host,
# and the ops' CUDA branch wired to stand-in backends. Fake CUDA tensors on a CPU-only
# torch build support only some ops (an op that needs a CUDA device guard, even
# indexing, raises "not linked with support for cuda devices", and recording autograd
# on them aborts the process), so those tests stay in no_grad with padded input.
# The GPU tests run where torch sees a CUDA device and fusedrnn's CUDA backend is usable.

CUDA = torch.cuda.is_available() and fusedrnn.cuda_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device usable by torch and by fusedrnn's CUDA backend "
                     f"(torch.cuda.is_available()={torch.cuda.is_available()}; "
                     f"{fusedrnn.cuda_status()})")

#: bfloat16 / float16 against torch.nn in float32 on the same (rounded) inputs and
#: weights, relative to the result's scale: (forward, gradients). fusedrnn keeps the
#: state h in the array type (as cuDNN does), so every step rounds it (relative 2^-9 for
#: bfloat16, 2^-12 for float16) and the next steps carry that error. Two measurements on
#: the CPU set the bounds: simulating exactly that rounding with torch (2 layers, T=20,
#: B=8, I=16, H=32, 20 seeds) gave forward errors up to 4.3e-3 (bfloat16) and 6.2e-4
#: (float16); torch.nn's own CPU bfloat16/float16 modules on this test's problems (they
#: round more intermediates) gave up to 9.3e-3 / 1.2e-3 forward and 1.7e-2 / 2.5e-3 for
#: the gradients. The bounds are 2-4x the larger of those. ReLU RNN gradients are not
#: compared: a pre-activation that rounding moves across 0 switches its derivative
#: between 0 and 1 (torch.nn's own float16 ReLU gradients were 8e-2 off).
LOW_TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (3e-3, 1e-2)}


@pytest.fixture
def no_tf32():
    """torch.nn on CUDA without TF32 products (cuDNN and cuBLAS), restored afterwards:
    fusedrnn computes float32 in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fake_cuda_module(cls, *args, dtype=torch.float32, **kwargs):
    """A fusedrnn module whose parameters are fake CUDA tensors (no grad), made inside a
    FakeTensorMode (torch's random init cannot run on fake CUDA tensors here)."""
    m = cls(*args, device="meta", dtype=dtype, **kwargs)
    for name in m._flat_weights_names:
        shape = getattr(m, name).shape
        setattr(m, name, torch.nn.Parameter(torch.empty(shape, device="cuda", dtype=dtype),
                                            requires_grad=False))
    with warnings.catch_warnings():  # flatten_parameters: "compiled without cuDNN"
        warnings.simplefilter("ignore", UserWarning)
        m._init_flat_weights()
    return m


def test_cuda_checks_and_errors_on_fake_cuda_tensors(monkeypatch):
    """What the modules accept and refuse for CUDA tensors, before any kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu_module = frnn.GRU(I, H)
    monkeypatch.setattr(fusedrnn, "cuda_available", lambda: True)
    with FakeTensorMode(), torch.no_grad():
        x = lambda dt=torch.float32: torch.empty(T, B, I, device="cuda", dtype=dt)  # noqa: E731
        # float32, float16 and bfloat16 run; outputs on the input's device, in its dtype
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            m = _fake_cuda_module(frnn.LSTM, I, H, num_layers=2, bidirectional=True, dtype=dt)
            y, (h, c) = m(x(dt))
            for t, shape in ((y, (T, B, 2 * H)), (h, (4, B, H)), (c, (4, B, H))):
                assert (t.device.type, t.dtype, tuple(t.shape)) == ("cuda", dt, shape)
        # float64: the CPU runs it, the CUDA backend does not
        m = _fake_cuda_module(frnn.GRU, I, H, dtype=torch.float64)
        with pytest.raises(TypeError, match=r"float32, float16 and bfloat16 on CUDA .*float64"):
            m(x(torch.float64))
        # module on the CPU, input on CUDA: torch.nn's error
        with pytest.raises(RuntimeError, match="not at the same device"):
            cpu_module(x())
        # projection: y and h have proj_size columns, c hidden_size
        m = _fake_cuda_module(frnn.LSTM, I, H, proj_size=P, num_layers=2)
        y, (h, c) = m(x())
        assert (tuple(y.shape), tuple(h.shape), tuple(c.shape)) == ((T, B, P), (2, B, P), (2, B, H))
        # checkpoint runs too (no cache under no_grad)
        m = _fake_cuda_module(frnn.GRU, I, H)
        for ck in (True, 3):
            m.checkpoint = ck
            assert tuple(m(x())[0].shape) == (T, B, H)
        m.checkpoint = 0  # an invalid value: the same error as on the CPU
        with pytest.raises(ValueError, match="checkpoint must be a bool or a positive int"):
            m(x())
        # no usable CUDA backend: check_device's error at the module's first check
        monkeypatch.setattr(fusedrnn, "cuda_available", lambda: False)
        m.checkpoint = False
        with pytest.raises(RuntimeError, match="CUDA backend cannot run it"):
            m(x())


def test_fake_implementations_put_outputs_on_the_input_device():
    """Under torch.compile the fake implementations give the outputs' devices: the
    input's device and dtype for every result, the CPU for the handle (as the real one),
    and for layer_backward the forward's device even when no gradient is given."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dt = torch.bfloat16
    with FakeTensorMode(), torch.no_grad():
        e = lambda *s: torch.empty(*s, device="cuda", dtype=dt)  # noqa: E731
        for cell in ("lstm", "gru"):
            G = fusedrnn.CELLS[cell]
            y, h_n, c_n, handle = torch.ops.fusedrnn.layer_forward(
                e(B, T, I), e(G * H, I), e(G * H, H), e(G * H), None, e(B, H), None, None,
                torch.tensor([T, 2, 1]), cell, False, True, True)
            assert handle.device.type == "cpu" and handle.dtype == torch.int64
            assert handle.shape == (1,)
            for t in (y, h_n, c_n):
                assert t.device.type == "cuda" and t.dtype == dt
            assert c_n.shape == ((B, H) if cell == "lstm" else (0,))
            sizes = ([B, T, I], [G * H, I], [G * H, H], None)
            for grads, device in (((None, None, None), torch.device("cuda")),  # formula's call
                                  ((e(B, T, H), None, None), None)):  # device from dy
                out = torch.ops.fusedrnn.layer_backward(handle, *grads, cell, True, *sizes, dt,
                                                        device)
                for t in out:
                    assert t.device.type == "cuda" and t.dtype == dt
                assert [tuple(t.shape) for t in out] == [
                    (B, T, I), (B, H), (B, H) if cell == "lstm" else (0,), (G * H, I),
                    (G * H, H), (G * H,), (G * H,), (0,)]


def test_packed_lengths_stay_on_the_host_for_device_data():
    """Packed input on a device: the index maps follow the data, the lengths are
    computed from the CPU batch_sizes on the CPU (no device-to-host copy per layer).
    The meta device stands in for CUDA here."""
    batch_sizes = torch.tensor([3, 2, 2, 1, 1])
    x, lengths, pad_index, pack_index = frnn._packed_to_padded(
        torch.empty(9, I, device="meta"), batch_sizes, 3)
    assert x.device.type == pad_index.device.type == pack_index.device.type == "meta"
    assert lengths.device.type == "cpu" and lengths.tolist() == [5, 3, 1]
    _, lengths_cpu, _, _ = frnn._packed_to_padded(torch.zeros(9, I), batch_sizes, 3)
    assert torch.equal(lengths, lengths_cpu)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_branch_of_the_ops_passes_tensors_through(cell, monkeypatch):
    """The ops' CUDA branch, with stand-in fusedrnn.forward/_backward that run the CPU
    kernels: the backend gets the module's tensors themselves (no NumPy conversion, no
    copy), its torch results come back as they are, and the results match torch.nn."""
    real_forward, real_backward = fusedrnn.forward, fusedrnn._backward
    from fusedrnn import _device

    class StandInCache(_device.DeviceCache):
        def __init__(self, inner):  # noqa: D401 - no device memory here
            self.inner = inner

    seen = {"forward": 0, "backward": 0, "ptrs": set()}
    host = lambda a: None if a is None else a.numpy()  # noqa: E731

    def forward(cell_, x, *args, lengths=None, w_hr=None, **kw):
        for a in (x, *args, lengths, w_hr):
            assert a is None or isinstance(a, torch.Tensor), type(a)
        seen["forward"] += 1
        seen["ptrs"].update(a.data_ptr() for a in args[:2])
        y, h_n, c_n, cache = real_forward(cell_, host(x), *map(host, args), lengths=host(lengths),
                                          w_hr=host(w_hr), **kw)
        t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return t(y), t(h_n), t(c_n), None if cache is None else StandInCache(cache)

    def backward(cache, dy, dh_n=None, dc_n=None, need_x=True, need_h0=True, need_c0=True):
        assert isinstance(cache, StandInCache)
        for a in (dy, dh_n, dc_n):
            assert a is None or isinstance(a, torch.Tensor), type(a)
        seen["backward"] += 1
        g = real_backward(cache.inner, host(dy), host(dh_n), host(dc_n), need_x, need_h0,
                          need_c0)
        return {k: None if v is None else torch.from_numpy(v) for k, v in g.items()}

    monkeypatch.setattr(fusedrnn, "forward", forward)
    monkeypatch.setattr(fusedrnn, "_backward", backward)
    monkeypatch.setattr(_torch_ops, "_on_cuda", lambda t: True)
    for kind in ("packed", "padded"):
        compare(cell, torch.float64, kind, num_layers=2, bidirectional=True, h0=True)
    assert seen["forward"] == 8 and seen["backward"] == 8  # 2 inputs x 2 layers x 2 directions
    if cell == "lstm":  # projection: w_hr goes to the backend as a tensor, dw_hr comes back
        compare(cell, torch.float64, "padded", num_layers=2, proj_size=P, h0=True)
        assert seen["forward"] == 10 and seen["backward"] == 10
    m = getattr(frnn, CELLS[cell][0])(I, H, dtype=torch.float64)
    seen["ptrs"].clear()
    m(torch.randn(T, B, I, dtype=torch.float64))
    assert seen["ptrs"] == {m.weight_ih_l0.data_ptr(), m.weight_hh_l0.data_ptr()}


# --------------------------------------------------------------- on a GPU

CUDA_OPTIONS = {"num_layers": (1, 2), "bidirectional": (False, True),
                "batch_first": (False, True), "bias": (True, False), "h0": (True, False)}


@needs_cuda
@pytest.mark.parametrize("input_kind", INPUTS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_cuda_parity_with_torch_nn(cell, input_kind, no_tf32):
    """float32 on CUDA against torch.nn (cuDNN, no TF32) on the same device and weights:
    outputs, states and all gradients within 1e-4 of the result's scale, over a pairwise
    cover of layers 1-2 x bidirectional x batch_first x bias x h0."""
    for seed, combo in enumerate(pairwise(CUDA_OPTIONS)):
        compare(cell, torch.float32, input_kind, seed=seed, device="cuda", **combo)


@needs_cuda
@pytest.mark.parametrize("input_kind", INPUTS)
def test_cuda_projection_parity_with_torch_nn(input_kind, no_tf32):
    """LSTM(proj_size=P) on CUDA against torch.nn's (cuDNN), as above."""
    for seed, combo in enumerate(pairwise(CUDA_OPTIONS)):
        compare("lstm", torch.float32, input_kind, proj_size=P, seed=seed, device="cuda", **combo)


@needs_cuda
@pytest.mark.parametrize("checkpoint", [True, 3])
def test_cuda_checkpoint_attribute_gives_the_same_gradients(checkpoint, no_tf32):
    """The checkpoint attribute on CUDA (float32): outputs and gradients within 1e-5 of
    the full cache's (which auto may run on the persistent kernels; and cuBLAS may sum a
    segment's products in another order)."""
    test_checkpoint_attribute_gives_the_same_gradients(checkpoint, "cuda", torch.float32, 1e-5)


@needs_cuda
@pytest.mark.parametrize("algo", ["auto", "persistent"])
@pytest.mark.parametrize("input_kind", ["padded", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_parity_larger_problem(cell, input_kind, algo, monkeypatch, no_tf32):
    """A larger batch (auto picks the standard algorithm for B > 16) and the persistent
    kernel forced, through the module (2 layers, bidirectional, packed or padded)."""
    monkeypatch.setenv("FUSEDRNN_CUDA_ALGO", algo)
    T2, B2, I2, H2 = 12, 20, 16, 32
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(I2, H2, num_layers=2, bidirectional=True, **extra).cuda()
    ours = frnn.convert(getattr(torch.nn, name)(I2, H2, num_layers=2, bidirectional=True,
                                                **extra).cuda())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T2, B2, I2, device="cuda")
    lengths = torch.randint(1, T2 + 1, (B2,))
    lengths[0] = T2
    w = torch.randn(T2, B2, 2 * H2, device="cuda")
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) \
            if input_kind == "packed" else xi
        out, state = m(inp)
        if input_kind == "packed":
            out, _ = pad_packed_sequence(out, total_length=T2)
        h = state[0] if cell == "lstm" else state
        loss = (out * w).sum() + h.square().sum()
        results.append([out, h, *torch.autograd.grad(loss, [xi] + list(m.parameters()))])
    for want, got in zip(*results):
        assert got.device == want.device and got.dtype == want.dtype
        assert rel_err(got.detach().cpu().numpy(), want.detach().cpu().numpy()) <= 1e-4


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("input_kind", ["padded", "packed"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cuda_low_precision_against_float32(cell, input_kind, dtype, no_tf32):
    """bfloat16 / float16 modules against torch.nn in float32 on the same rounded inputs
    and weights, outputs and gradients (bounds and their reasons: LOW_TOL)."""
    T2, B2, I2, H2 = 20, 8, 16, 32
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(I2, H2, num_layers=2, bidirectional=True, **extra).cuda()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(prm.to(dtype).float())
    ours = getattr(frnn, name)(I2, H2, num_layers=2, bidirectional=True, **extra,
                               device="cuda", dtype=dtype)
    ours.load_state_dict(ref.state_dict())  # exact: the values are representable
    x = torch.randn(T2, B2, I2, device="cuda").to(dtype)
    lengths = torch.tensor([T2, 3, 11, 20, 1, 7, 15, 9])
    w = torch.randn(T2, B2, 2 * H2, device="cuda").to(dtype).float()
    results = []
    for m, xdt in ((ref, torch.float32), (ours, dtype)):
        xi = x.to(xdt).requires_grad_(True)
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) \
            if input_kind == "packed" else xi
        out, state = m(inp)
        if input_kind == "packed":
            out, _ = pad_packed_sequence(out, total_length=T2)
        h = state[0] if cell == "lstm" else state
        loss = (out.float() * w).sum() + h.float().sum()
        results.append([out, h, *torch.autograd.grad(loss, [xi] + list(m.parameters()))])
    fwd_tol, grad_tol = LOW_TOL[dtype]
    names = ["y", "h_n", "dx"] + [f"d{n}" for n, _ in ours.named_parameters()]
    for k, want, got in zip(names, *results):
        assert got.dtype == dtype and got.device == want.device, k
        e = rel_err(got.detach().float().cpu().numpy(), want.detach().cpu().numpy())
        if k not in ("y", "h_n") and cell == "rnn_relu":
            continue  # see LOW_TOL
        tol = fwd_tol if k in ("y", "h_n") else grad_tol
        assert e <= tol, f"{k}: relative error {e:.2e} > {tol:.0e}"


@needs_cuda
def test_cuda_compile_fullgraph_inductor_and_packed(no_tf32):
    """torch.compile(fullgraph=True) of forward + backward on CUDA tensors: inductor on
    the mixed model, aot_eager on packed input (handles stay CPU tensors in the graph)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model().cuda()
    x = torch.randn(B, T, I, device="cuda", requires_grad=True)
    h0 = torch.randn(1, B, H, device="cuda", requires_grad=True)
    _compiled_matches_eager(model, [(x, h0)], "inductor", tol=1e-5)

    m = frnn.LSTM(I, H, bidirectional=True, device="cuda")

    def f(packed):
        out, (h, c) = m(packed)
        return (out.data.square().sum() + h.sum() + c.sum(),)

    xs = torch.randn(T, B, I, device="cuda", requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = [], []
    for fn, res in ((f, want), (compiled, got)):
        packed = pack_padded_sequence(xs, torch.tensor([T, 2, 4]), enforce_sorted=False)
        (loss,) = fn(packed)
        res += [loss, *torch.autograd.grad(loss, [xs] + list(m.parameters()))]
    for a, b in zip(got, want):
        assert a.device == b.device
        assert rel_err(a.detach().cpu().numpy(), b.detach().cpu().numpy()) <= 1e-6


@needs_cuda
def test_cuda_custom_op_opcheck():
    """opcheck on CUDA tensors (lengths on the device: the backend copies them to the
    host itself)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).cuda().requires_grad_(True)

    args = (r(T, B, I), r(4 * H, I), r(4 * H, H), r(4 * H), None, r(B, H), r(B, H), None,
            torch.tensor([T, 2, 0], device="cuda"), "lstm", True, False, True)
    result = torch.library.opcheck(torch.ops.fusedrnn.layer_forward.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@needs_cuda
def test_cuda_caches_freed_inference_and_errors():
    import gc
    gc.collect()
    base = _torch_ops.live_caches()
    m = frnn.LSTM(I, H, num_layers=2, bidirectional=True, device="cuda")
    x = torch.randn(T, B, I, device="cuda")
    y, _ = m(x)
    assert _torch_ops.live_caches() == base + 4
    y.sum().backward()  # frees the graph, and with it the caches
    assert all(p.grad is not None and p.grad.device == x.device for p in m.parameters())
    gc.collect()
    assert _torch_ops.live_caches() == base
    with torch.no_grad():
        y2, _ = m(x)  # inference: no cache kept
    assert _torch_ops.live_caches() == base
    assert rel_err(y2.cpu().numpy(), y.detach().cpu().numpy()) <= 1e-6

    with pytest.raises(RuntimeError, match="not at the same device"):
        frnn.GRU(I, H)(x)
    with pytest.raises(TypeError, match="float64"):
        frnn.GRU(I, H, device="cuda", dtype=torch.float64)(x.double())
    ck = frnn.GRU(I, H, device="cuda")
    ck.checkpoint = 0
    with pytest.raises(ValueError, match="checkpoint must be a bool or a positive int"):
        ck(x)


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_weights_changed_in_place_before_backward_are_refused(cell, proj):
    """Eager training on the CPU: the forward's cache reads the module's weights
    themselves instead of copies (_EagerLayer, share_weights) and saves them for
    backward. Changing one in place between forward and backward (optimizer.step()
    first) then raises autograd's error, as torch.nn does, rather than differentiating
    with other weights than the forward used: W_hh and W_hr always; W_ih when x requires
    grad or with checkpointing (otherwise no gradient depends on it, and backward runs
    with the forward's gradients). torch.nn refuses too, except for W_ih with
    checkpointing, which it does not have.
    H = 16 fills whole unit blocks, so W_ih is shared too; H = 10 does not (copied)."""
    if proj and cell != "lstm":
        pytest.skip("projection: lstm only")
    name, kw = CELLS[cell]
    if proj:
        kw = dict(kw, proj_size=4)
    x0 = torch.randn(3, 2, 5)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0"] + (["weight_hr_l0"] if proj else [])
    for hidden, pname, x_grad, ck in itertools.product((16, 10), names, (False, True),
                                                       (False, True)):
        refused = pname in ("weight_hh_l0", "weight_hr_l0") or (
            pname == "weight_ih_l0" and (x_grad or ck))
        torch.manual_seed(0)
        ref = getattr(torch.nn, name)(5, hidden, **kw)
        m = getattr(frnn, name)(5, hidden, **kw)
        m.load_state_dict(ref.state_dict())
        m.checkpoint = ck
        grads = {}
        for mod in (ref, m):
            x = x0.clone().requires_grad_(x_grad)
            y = mod(x)[0]
            if mod is m:
                with torch.no_grad():
                    getattr(m, pname).add_(1.0)
            if mod is m and refused:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    y.pow(2).sum().backward()
                continue
            y.pow(2).sum().backward()
            grads[mod] = [p.grad for p in mod.parameters()] + ([x.grad] if x_grad else [])
        if not refused:  # the gradients of the forward that ran
            for a, b in zip(grads[ref], grads[m]):
                assert rel_err(b, a) < 1e-4, (hidden, pname, x_grad, ck)
        elif pname != "weight_ih_l0" or x_grad:  # torch.nn refuses too
            m2 = getattr(torch.nn, name)(5, hidden, **kw)
            y = m2(x0.clone().requires_grad_(x_grad))[0]
            with torch.no_grad():
                getattr(m2, pname).add_(1.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()

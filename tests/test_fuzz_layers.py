"""Fuzzing of the layers built on forward/backward: fusedrnn.models and fusedrnn.torch.

Models (``RNN`` and ``RNNModel``): random constructor arguments (cell, layers,
directions, sizes down to 1, dropout, bias, dtype, output) and calls (T and B down to
0, batch_first, x as a Fortran-order, strided or read-only array, h0/c0, lengths of
any integer dtype or a mask, checkpoint, dout/dh_n/dc_n for backward), each example
with at most one deliberate mistake (a bad constructor argument, x of the wrong dtype,
rank or size, h0/c0/dout/dh_n/dc_n of the wrong shape, c0/dc_n for a cell without
one, lengths out of range, of the wrong count or float, a mask of the wrong shape or
dtype, lengths and mask together, a bad batch_first or checkpoint, backward without
a cache or with another model's cache). Properties:

- a call raises exactly when it holds a mistake, and then a ValueError or TypeError
  with a message (nothing else, no crash);
- the compiled model and the same model on the NumPy reference backend (same seed:
  same parameters and dropout masks) raise the same error with the same message, or
  agree on outputs, final states and every gradient within DESIGN.md section 7;
- float64, smooth cells: the gradients match a central finite difference of
  <dout, out> + <dh_n, h_n> + <dc_n, c_n> along a random direction of all parameters,
  x, h0 and c0 (dropout masks fixed by reseeding): this checks the models' own
  composition (directions, dropout, output layer), which both backends share;
- training=False gives training=True's outputs when no dropout applies.

torch adapter (``fusedrnn.torch.RNN/GRU/LSTM``, made with ``load_state_dict`` or
``convert``): random configurations (cell, layers, directions, batch_first, bias,
proj_size, dtype, train/eval mode, the ``checkpoint`` attribute) and inputs (padded
with B down to 0, packed with and without enforce_sorted, unbatched; hx or not)
against torch.nn with the same weights: outputs, final states and the gradients of a
random weighted sum of them w.r.t. the input, hx and every parameter within DESIGN.md
section 7. A deliberately bad input (wrong feature size, dtype, rank, hx shape or rank,
empty sequence) raises the exception type torch.nn raises (docs/torch.md); a bad
``checkpoint`` attribute raises ValueError/TypeError naming it.

FUSEDRNN_FUZZ_EXAMPLES scales the example counts (default 300, as tests/test_fuzz.py;
each test here runs a fraction of it, see ``_examples``).
"""

import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedrnn
from fusedrnn import reference
from fusedrnn.models import RNN, RNNModel

from conftest import TOL, rel_err

EXAMPLES = int(os.environ.get("FUSEDRNN_FUZZ_EXAMPLES", "300"))
CELLS = list(fusedrnn.CELLS)


def _examples(fraction):
    return settings(max_examples=max(1, int(EXAMPLES * fraction)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# fusedrnn.models
# --------------------------------------------------------------------------

#: constructor mistakes: argument -> bad value
BAD_CTOR = {"cell": "lsmt", "cell_type": 3, "input_size": 0, "hidden_size": 2.0,
            "num_layers": 0, "dropout": 1.0, "dtype": np.float16, "bias": 1,
            "output": "first"}
#: call mistakes (forward and backward)
BAD_CALL = ["x_dtype", "x_rank", "x_size", "h0_shape", "c0_shape", "lengths_range",
            "lengths_count", "lengths_float", "mask_shape", "mask_dtype", "lengths_and_mask",
            "batch_first_type", "checkpoint_value", "checkpoint_type", "dout_shape",
            "dh_n_shape", "dc_n_shape", "cache_none", "cache_foreign"]


@st.composite
def model_specs(draw):
    """A model and one forward + backward call, with at most one mistake."""
    kind = draw(st.sampled_from(["RNN", "RNNModel"]))
    cell = draw(st.sampled_from(CELLS))
    ctor = dict(cell=cell, input_size=draw(st.integers(1, 4)),
                hidden_size=draw(st.integers(1, 4)), num_layers=draw(st.integers(1, 3)),
                bidirectional=draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.0, 0.4])),
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float64])))
    if kind == "RNNModel":
        ctor.update(output_size=draw(st.integers(1, 3)),
                    output=draw(st.sampled_from(["sequence", "last"])))
    mistake = draw(st.sampled_from(["none"] * 20 + ["ctor"] * 3 + BAD_CALL))  # ~half valid
    if mistake == "ctor":
        arg = draw(st.sampled_from([k for k in BAD_CTOR if k != "output" or kind == "RNNModel"]))
        ctor["cell" if arg == "cell_type" else arg] = BAD_CTOR[arg]
        mistake = f"ctor_{arg}"
    if mistake in ("c0_shape", "dc_n_shape") and cell != "lstm" and draw(st.booleans()):
        mistake = mistake.replace("shape", "not_lstm")  # c0 / dc_n for a cell without one
    call = dict(T=draw(st.integers(0, 4)), B=draw(st.integers(0, 3)),
                batch_first=draw(st.booleans()),
                layout=draw(st.sampled_from(["c", "fortran", "strided", "readonly"])),
                h0=draw(st.booleans()), c0=cell == "lstm" and draw(st.booleans()),
                extra=draw(st.sampled_from(["none", "lengths", "mask"])),
                lengths_dtype=draw(st.sampled_from([np.int64, np.int32, np.int8, np.uint8, list])),
                checkpoint=draw(st.sampled_from([False, False, True, 1, 2])),
                dout=draw(st.booleans()), dh_n=draw(st.booleans()),
                dc_n=cell == "lstm" and draw(st.booleans()))
    return kind, ctor, call, mistake, draw(st.integers(0, 2**16))


def _model_inputs(ctor, call, mistake, seed):
    """Arrays and keyword arguments of the call (the same for both backends)."""
    rng = np.random.default_rng(seed)
    T, B, bf = call["T"], call["B"], call["batch_first"]
    dtype = ctor["dtype"] if ctor["dtype"] in (np.float32, np.float64) else np.float32
    I = ctor["input_size"] if isinstance(ctor["input_size"], int) and ctor["input_size"] > 0 else 2
    H = ctor["hidden_size"] if isinstance(ctor["hidden_size"], int) else 2
    L = max(ctor["num_layers"], 1)
    LD = L * (2 if ctor["bidirectional"] else 1)
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)  # noqa: E731

    I_x = I + (mistake == "x_size")
    x = r(B, T, I_x) if bf else r(T, B, I_x)
    if mistake == "x_dtype":
        x = x.astype(np.float64 if dtype == np.float32 else np.int32)
    if mistake == "x_rank":
        x = x[..., None]
    if call["layout"] == "fortran":
        x = np.asfortranarray(x)
    elif call["layout"] == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    elif call["layout"] == "readonly":
        x.setflags(write=False)

    a = {"x": x, "h0": None, "c0": None}
    if call["h0"] or mistake == "h0_shape":
        a["h0"] = r(LD + (mistake == "h0_shape"), B, H)
    if call["c0"] or mistake in ("c0_shape", "c0_not_lstm"):
        a["c0"] = r(LD, B + (mistake == "c0_shape"), H)
    kw = {"batch_first": "yes" if mistake == "batch_first_type" else bf,
          "checkpoint": {"checkpoint_value": 0, "checkpoint_type": 1.5}.get(
              mistake, call["checkpoint"])}
    extra = call["extra"]
    if extra == "lengths" or mistake.startswith("lengths"):
        lengths = rng.integers(0, T + 1, size=B)
        if mistake == "lengths_range":
            lengths = np.append(lengths[1:], T + 1)  # B = 0: a count mismatch instead
        if mistake == "lengths_count":
            lengths = rng.integers(0, T + 1, size=B + 1)
        if mistake == "lengths_float":
            lengths = lengths.astype(np.float64)
        elif call["lengths_dtype"] is list:
            if B:  # np.asarray([]) is float64, rightly refused as lengths
                lengths = lengths.tolist()
        else:
            lengths = lengths.astype(call["lengths_dtype"])
        kw["lengths"] = lengths
    if extra == "mask" or mistake.startswith("mask") or mistake == "lengths_and_mask":
        shape = (B, T) if bf else (T, B)
        if mistake == "mask_shape":
            shape = (shape[0] + 1, shape[1])
        m = rng.random(shape) < 0.6
        kw["mask"] = m.astype(np.int8) if mistake == "mask_dtype" else m
    return a, kw


def _run_model(backend, kind, ctor, call, mistake, seed):
    """(error, results): error is None or (stage, type, message)."""
    stage = "constructor"
    try:
        cls = RNNModel if kind == "RNNModel" else RNN
        model = cls(**ctor, seed=seed, backend=backend)
        a, kw = _model_inputs(ctor, call, mistake, seed)
        stage = "forward"
        model.reseed(seed)
        out, h_n, c_n, cache = model.forward(a["x"], a["h0"], a["c0"],
                                             training=mistake != "cache_none", **kw)
        if mistake == "cache_foreign":
            cache = cls(**ctor, seed=seed, backend=backend).forward(a["x"], a["h0"], a["c0"],
                                                                    **kw)[3]
        stage = "backward"
        rng = np.random.default_rng(seed + 1)
        r = lambda s: (rng.standard_normal(s) * 0.5).astype(model.dtype)  # noqa: E731
        dout = r(out.shape[:-1] + (out.shape[-1] + (mistake == "dout_shape"),)) \
            if call["dout"] or mistake == "dout_shape" else None
        dh_n = r((h_n.shape[0] + (mistake == "dh_n_shape"),) + h_n.shape[1:]) \
            if call["dh_n"] or mistake == "dh_n_shape" else None
        dc_n = None
        if call["dc_n"] or mistake in ("dc_n_shape", "dc_n_not_lstm"):
            dc_n = r((h_n.shape[0], h_n.shape[1] + (mistake == "dc_n_shape"), h_n.shape[2]))
        grads, dinputs = model.backward(cache, dout, dh_n, dc_n)
    except (ValueError, TypeError) as e:
        assert str(e), "an error message must say what is wrong"
        return (stage, type(e), str(e)), None
    return None, dict(model=model, inputs=a, kw=kw, out=out, h_n=h_n, c_n=c_n,
                      dout=dout, dh_n=dh_n, dc_n=dc_n, grads=grads, dinputs=dinputs)


class _Float32Draws:
    """Draws as a float32 model's dropout generator does (the same masks in float64)."""

    def __init__(self, seed):
        self.gen = np.random.default_rng(seed)

    def random(self, shape, dtype=None):
        return self.gen.random(shape, dtype=np.float32)


def _float64_run(kind, ctor, seed, res):
    """The float32 call of ``res`` repeated in float64 on the reference backend."""
    model = (RNNModel if kind == "RNNModel" else RNN)(**dict(ctor, dtype=np.float64),
                                                     seed=seed, backend=reference)
    for k, p in res["model"].params.items():
        model.params[k][...] = p
    (model.rnn if kind == "RNNModel" else model).rng = _Float32Draws(seed)
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    a = res["inputs"]
    out, h_n, c_n, cache = model.forward(f64(a["x"]), f64(a["h0"]), f64(a["c0"]), **res["kw"])
    grads, dinputs = model.backward(cache, f64(res["dout"]), f64(res["dh_n"]), f64(res["dc_n"]))
    return dict(out=out, h_n=h_n, c_n=c_n, grads=grads, dinputs=dinputs)


def _directional_check(res, seed):
    """Central difference of <dout, out> + <dh_n, h_n> + <dc_n, c_n> along a random
    direction of (parameters, x, h0, c0) vs the analytic gradients' dot product."""
    model, a, kw = res["model"], res["inputs"], dict(res["kw"])
    rng = np.random.default_rng(seed + 2)
    x = np.array(a["x"])  # a writable copy
    given = {"x": x}
    given.update({k: a[k] for k in ("h0", "c0") if a[k] is not None})
    dirs = {k: rng.standard_normal(v.shape) for k, v in given.items()}
    pdirs = {k: rng.standard_normal(p.shape) for k, p in model.params.items()}
    weights = [(res["dout"], 0), (res["dh_n"], 1), (res["dc_n"], 2)]

    def loss(eps):
        saved = {k: p.copy() for k, p in model.params.items()}
        for k, p in model.params.items():
            p += eps * pdirs[k]
        try:
            model.reseed(seed)  # the same dropout masks as the analytic run
            args = {k: v + eps * dirs[k] for k, v in given.items()}
            outs = model.forward(args["x"], args.get("h0"), args.get("c0"), training=True,
                                 **kw)
        finally:
            for k, p in model.params.items():
                p[...] = saved[k]
        return sum(float(np.sum(w * outs[i])) for w, i in weights if w is not None)

    analytic = sum(float(np.sum(res["grads"][k] * pdirs[k])) for k in pdirs)
    analytic += sum(float(np.sum(res["dinputs"][k] * dirs[k])) for k in dirs)
    scale = sum(float(np.sum(np.abs(res["grads"][k] * pdirs[k]))) for k in pdirs)
    scale += sum(float(np.sum(np.abs(res["dinputs"][k] * dirs[k]))) for k in dirs)
    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    err = abs(numeric - analytic)
    print(f"directional derivative: analytic {analytic:.12e}, central difference "
          f"{numeric:.12e}, difference {err:.2e} (scale {scale:.2e})")
    assert err <= 1e-6 * scale + 1e-8, (numeric, analytic)


@_examples(1)
@given(model_specs())
def test_models_fuzz(spec):
    kind, ctor, call, mistake, seed = spec
    err_c, res_c = _run_model(None, *spec)
    err_r, res_r = _run_model(reference, *spec)
    event(f"{kind}: {'raised' if err_c else 'ran'}")
    assert err_c == err_r, (err_c, err_r)
    assert (err_c is not None) == (mistake != "none"), (mistake, err_c)
    if err_c is not None:
        return
    tol = TOL[np.dtype(ctor["dtype"]).type]
    for k, p in res_c["model"].params.items():  # same seed, same parameters
        assert np.array_equal(p, res_r["model"].params[k]), k
    assert list(res_c["grads"]) == list(res_c["model"].params)
    truth = []  # the float64 run, made when a float32 comparison needs it
    for group in (None, "grads", "dinputs"):
        got, want = (res_c, res_r) if group is None else (res_c[group], res_r[group])
        keys = ("out", "h_n", "c_n") if group is None else list(want)
        assert group is None or got.keys() == want.keys()
        for k in keys:
            err = rel_err(got[k], want[k])
            if err > tol and ctor["dtype"] == np.float32:
                # the float32 reference is not exact either (e.g. a gradient that is a
                # small difference of large terms): measure both against float64 and
                # allow the compiled model twice the reference's error there
                if not truth:
                    truth.append(_float64_run(kind, ctor, seed, res_c))
                t = truth[0] if group is None else truth[0][group]
                ours_err, ref_err = rel_err(got[k], t[k]), rel_err(want[k], t[k])
                print(f"{group} {k}: relative error {err:.2e}; vs float64: compiled "
                      f"{ours_err:.2e}, reference {ref_err:.2e}")
                assert ours_err <= max(tol, 2 * ref_err), (group, k, ours_err, ref_err)
                continue
            assert err <= tol, (group, k, err)

    model, a, kw = res_c["model"], res_c["inputs"], res_c["kw"]
    if ctor["dropout"] == 0 or ctor["num_layers"] == 1:
        out, h_n, c_n, cache = model.forward(a["x"], a["h0"], a["c0"], training=False, **kw)
        assert cache is None
        for k, v in (("out", out), ("h_n", h_n), ("c_n", c_n)):
            assert rel_err(v, res_c[k]) <= tol, k
    if ctor["dtype"] == np.float64 and ctor["cell"] != "rnn_relu":  # relu: kinks
        _directional_check(res_c, seed)


# --------------------------------------------------------------------------
# fusedrnn.torch
# --------------------------------------------------------------------------

TORCH_NAMES = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "gru": "GRU", "lstm": "LSTM"}
#: bad inputs and the exception type torch.nn raises for them (docs/torch.md)
BAD_TORCH = {"input_size": RuntimeError, "x_dtype": ValueError, "x_rank": ValueError,
             "hx_shape": RuntimeError, "hx_rank": RuntimeError, "empty_sequence": RuntimeError,
             "checkpoint": (ValueError, TypeError)}


@st.composite
def torch_calls(draw):
    cell = draw(st.sampled_from(list(TORCH_NAMES)))
    H = draw(st.integers(1, 5))
    cfg = dict(input_size=draw(st.integers(1, 5)), hidden_size=H,
               num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
               batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if cell == "lstm" and H > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, H - 1))
    if cell.startswith("rnn"):
        cfg["nonlinearity"] = cell[4:]
    kind = draw(st.sampled_from(["padded", "packed", "packed_sorted", "unbatched"]))
    call = dict(kind=kind, T=draw(st.integers(1, 5)),
                B=draw(st.integers(0 if kind == "padded" else 1, 4)),
                hx=draw(st.booleans()), make=draw(st.sampled_from(["load_state_dict", "convert"])),
                train=draw(st.booleans()), checkpoint=draw(st.sampled_from([False, True, 2])),
                dtype=draw(st.sampled_from(["float32", "float64"])))
    mistake = draw(st.sampled_from(["none"] * 8 + list(BAD_TORCH)))
    if (mistake == "empty_sequence" and kind != "padded"
            or mistake == "x_rank" and kind.startswith("packed")):  # no such input
        mistake = "none"
    return cell, cfg, call, mistake, draw(st.integers(0, 2**16))


def _torch_modules(torch, frnn, cell, cfg, call, seed):
    """(torch.nn module, fusedrnn.torch module) with identical weights."""
    dtype = getattr(torch, call["dtype"])
    ref = getattr(torch.nn, TORCH_NAMES[cell])(**cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    k = 1.0 / cfg["hidden_size"] ** 0.5
    with torch.no_grad():  # weights from the example's seed, not the global generator
        for p in ref.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=dtype) * 2 - 1) * k)
    if call["make"] == "convert":
        ours = frnn.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0]
        assert type(ours) is getattr(frnn, TORCH_NAMES[cell])
    else:
        ours = getattr(frnn, TORCH_NAMES[cell])(**cfg, dtype=dtype)
        ours.load_state_dict(ref.state_dict(), strict=True)
    for m in (ref, ours):
        m.train(call["train"])
    ours.checkpoint = call["checkpoint"]
    return ref, ours


def _torch_inputs(torch, cell, cfg, call, mistake, seed):
    """(x, lengths, hx) for the call, with the mistake applied."""
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = getattr(torch, call["dtype"])
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    T, B, kind = call["T"], call["B"], call["kind"]
    if mistake == "empty_sequence":
        T = 0
    I = cfg["input_size"] + (mistake == "input_size")
    if kind == "unbatched":
        x = randn(T, I)
    else:
        x = randn(B, T, I) if cfg["batch_first"] else randn(T, B, I)
    if mistake == "x_dtype":
        x = x.to(torch.float64 if dtype == torch.float32 else torch.float32)
    if mistake == "x_rank":
        x = x[0] if kind == "unbatched" else x[None]
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        if kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
    hx = None
    if call["hx"] or mistake in ("hx_shape", "hx_rank"):
        LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
        P = cfg.get("proj_size", 0) or cfg["hidden_size"]
        H = cfg["hidden_size"]
        batch = () if kind == "unbatched" else (B,)
        if mistake == "hx_shape":
            # packed, unsorted: torch.nn takes hx's rows by sorted_indices, so extra rows
            # pass (in both); a wrong state size does not
            if kind == "packed":
                P, H = P + 1, H + 1
            elif kind == "unbatched":
                LD += 1
            else:
                batch = (B + 1,)
        hx = [randn(LD, *batch, P)]
        if cell == "lstm":
            hx.append(randn(LD, *batch, H))
        if mistake == "hx_rank":
            hx = [h[0] if kind != "unbatched" else h[None] for h in hx]
    return x, lengths, hx


def _torch_run(torch, module, cell, cfg, call, x, lengths, hx, seed):
    """Forward and the gradients of a random weighted sum of the outputs."""
    from torch.nn.utils.rnn import pack_padded_sequence

    xg = x.clone().requires_grad_(True)
    inp = xg
    if lengths is not None:
        inp = pack_padded_sequence(xg, lengths, batch_first=cfg["batch_first"],
                                   enforce_sorted=call["kind"] == "packed_sorted")
    hxg = None if hx is None else [h.clone().requires_grad_(True) for h in hx]
    args = (inp,) if hxg is None else (inp, tuple(hxg) if cell == "lstm" else hxg[0])
    out, state = module(*args)
    packed = lengths is not None
    outs = {"out": out.data if packed else out}
    if packed:
        outs.update(batch_sizes=out.batch_sizes, sorted_indices=out.sorted_indices,
                    unsorted_indices=out.unsorted_indices)
    states = list(state) if cell == "lstm" else [state]
    outs.update({f"state{i}": s for i, s in enumerate(states)})
    w = torch.Generator().manual_seed(seed + 2)
    loss = sum((t * torch.randn(t.shape, generator=w, dtype=torch.float64).to(t.dtype)).sum()
               for t in [outs["out"]] + states)
    names = [n for n, _ in module.named_parameters()]
    leaves = [xg] + list(module.parameters()) + (hxg or [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    keys = ["dx"] + [f"d{n}" for n in names] + [f"dhx{i}" for i in range(len(hxg or []))]
    for k, g, leaf in zip(keys, grads, leaves):
        outs[k] = torch.zeros_like(leaf) if g is None else g
    return outs


def _float32_noise(torch, ref, cell, cfg, call, x, lengths, hx, seed, draws=4):
    """torch.nn's float32 error against float64, per output and gradient, at its worst
    over neighbouring problems: x, hx and every weight moved by one float32 ulp up or
    down at random (the same conditioning, other rounding luck)."""
    gen = torch.Generator().manual_seed(seed + 3)

    def nudge(t):
        up = torch.rand(t.shape, generator=gen) < 0.5
        return torch.where(up, torch.nextafter(t, torch.full_like(t, float("inf"))),
                           torch.nextafter(t, torch.full_like(t, float("-inf"))))

    worst = {}
    for _ in range(draws):
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for prm in m.parameters():
                prm.copy_(nudge(prm))
        xp, hxp = nudge(x), None if hx is None else [nudge(h) for h in hx]
        lo = _torch_run(torch, m, cell, cfg, call, xp, lengths, hxp, seed)
        hi = _torch_run(torch, copy.deepcopy(m).double(), cell, cfg, call, xp.double(), lengths,
                        None if hxp is None else [h.double() for h in hxp], seed)
        for k, v in lo.items():
            if v is not None and not k.endswith("indices") and k != "batch_sizes":
                err = rel_err(v.detach().numpy(), hi[k].detach().numpy())
                worst[k] = max(worst.get(k, 0.0), err)
    return worst


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")
@_examples(1 / 2)
@given(torch_calls())
def test_torch_adapter_fuzz(spec):
    torch = pytest.importorskip("torch")
    import fusedrnn.torch as frnn

    cell, cfg, call, mistake, seed = spec
    event(f"{call['kind']}, {mistake}")
    ref, ours = _torch_modules(torch, frnn, cell, cfg, call, seed)
    x, lengths, hx = _torch_inputs(torch, cell, cfg, call, mistake, seed)
    run = lambda m: _torch_run(torch, m, cell, cfg, call, x, lengths, hx, seed)  # noqa: E731
    if mistake == "checkpoint":  # fusedrnn's own attribute: ValueError / TypeError naming it
        ours.checkpoint = 0 if seed % 2 else "sqrt"
        with pytest.raises(BAD_TORCH[mistake], match="checkpoint"):
            run(ours)
        return
    if mistake != "none":
        with pytest.raises(Exception) as got:
            run(ours)
        print(f"fusedrnn: {got.type.__name__}: {got.value}")
        assert got.type is BAD_TORCH[mistake], got.value
        if lengths is None:
            # torch.nn skips some checks for a PackedSequence (a packed input of the
            # wrong feature size corrupts its heap, torch 2.13), so compare only here
            with pytest.raises(Exception) as want:
                run(ref)
            print(f"torch.nn: {want.type.__name__}: {want.value}")
            assert got.type is want.type, (got.value, want.value)
        return
    want, got = run(ref), run(ours)
    assert want.keys() == got.keys()
    tol = TOL[np.float32 if call["dtype"] == "float32" else np.float64]
    truth = noise = None
    for k in want:
        a, b = got[k], want[k]
        if b is None or k.endswith("indices") or k == "batch_sizes":
            assert (a is None and b is None) or torch.equal(a, b), k
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype)
        err = rel_err(a.detach().numpy(), b.detach().numpy())
        print(f"{k:>20}: relative error {err:.2e} (tol {tol:.0e})")
        if err > tol and call["dtype"] == "float32":
            # torch.nn's float32 result is not exact either (a gradient that is a small
            # difference of large terms): measure both against torch.nn in float64 and
            # allow fusedrnn twice torch.nn's error there (STYLE.md, flash-attention)
            if truth is None:
                truth = _torch_run(torch, copy.deepcopy(ref).double(), cell, cfg, call,
                                   x.double(), lengths,
                                   None if hx is None else [h.double() for h in hx], seed)
            t = truth[k].detach().numpy()
            ours_err = rel_err(a.detach().numpy(), t)
            torch_err = rel_err(b.detach().numpy(), t)
            print(f"{'':>20}  vs float64: fusedrnn {ours_err:.2e}, torch.nn {torch_err:.2e}")
            allowed = max(tol, 2 * torch_err)
            if ours_err > allowed:
                # one float32 run's luck says little when a tiny array is a small
                # difference of large terms (dx of one value): allow twice torch.nn's
                # worst error over neighbouring problems too
                if noise is None:
                    noise = _float32_noise(torch, ref, cell, cfg, call, x, lengths, hx, seed)
                print(f"{'':>20}  torch.nn over neighbouring problems: {noise[k]:.2e}")
                allowed = max(allowed, 2 * noise[k])
            assert ours_err <= allowed, (
                f"{k}: relative error vs float64 {ours_err:.3e} > max({tol:.0e}, "
                f"2 x torch.nn's {torch_err:.3e}, 2 x torch.nn's worst over neighbouring "
                f"problems {noise[k] if noise else 0:.3e})")
            continue
        assert err <= tol, f"{k}: relative error {err:.3e} > {tol:.0e}"

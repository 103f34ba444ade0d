"""``python -m fusedrnn bench --jax``: fusedrnn.jax against a recurrent layer in JAX.

A JAX user's alternative to fusedrnn.jax is a layer written in JAX: the input
projection of all steps as one matmul, then ``jax.lax.scan`` over the steps with the
cell's math (the way Flax's ``nn.RNN`` runs a cell), jit-compiled. This mode times, per
case, interleaved like the layer benchmark (``_bench.time_interleaved``):

- ``jax.lax.scan``: that layer, ``jax.jit``-compiled (the peer);
- ``fusedrnn.jax``: ``fusedrnn.jax.rnn``, ``jax.jit``-compiled;
- ``fusedrnn``: ``fusedrnn.forward`` / ``backward`` on NumPy arrays, the same kernels
  without JAX: the difference to ``fusedrnn.jax`` is what the adapter costs (the copies
  that ``jax.pure_callback`` makes of the arrays going in and out).

Passes: forward (no gradient), and forward+backward: ``jax.grad`` of sum(y * dy) with
respect to x and every weight (fusedrnn's backward gets the same dy). Each case is
checked first: fusedrnn.jax's outputs and gradients against jax.lax.scan's (the float32
tolerance, relative to the scale) and against fusedrnn's (bitwise). XLA runs
jax.lax.scan on its own threads (all cores); ``--threads`` sets fusedrnn's.
"""

from __future__ import annotations

import sys
from typing import List, Tuple

import numpy as np

import fusedrnn

from . import _bench

__all__ = ["DEFAULT_SHAPES", "QUICK_SHAPES", "run", "scan_layer"]

#: (T, B, H) of the default cases (I = H)
DEFAULT_SHAPES = [(100, 1, 256), (100, 8, 256), (100, 32, 256), (100, 64, 512)]
QUICK_SHAPES = [(20, 8, 64)]
_PEER = "jax.lax.scan"
_PROVIDERS = (_PEER, "fusedrnn.jax", "fusedrnn")
_COLUMNS = ("cell", "T", "B", "H", "pass", "provider", "ms", "spread", "speedup vs lax.scan",
            "check")


_TABLE, _NUMERIC = _bench.peer_table(_COLUMNS, (9, 5, 5, 6, 17, 13, 10, 7, 20, 12))


def scan_layer(cell: str):
    """The peer: ``cell`` as a JAX function (x, w_ih, w_hh, b_ih, b_hh) -> y, zero initial
    state, time-major, PyTorch's gate orders (shared/DESIGN.md section 2)."""
    import jax  # noqa: PLC0415 - only this mode imports jax
    import jax.numpy as jnp  # noqa: PLC0415

    sigmoid, tanh = jax.nn.sigmoid, jnp.tanh
    act = {"rnn_tanh": tanh, "rnn_relu": jax.nn.relu, "rnn_sigmoid": sigmoid}.get(cell)

    def layer(x, w_ih, w_hh, b_ih, b_hh):
        T, B, I = x.shape
        H = w_hh.shape[1]
        gx = (x.reshape(T * B, I) @ w_ih.T + b_ih).reshape(T, B, -1)
        h0 = jnp.zeros((B, H), x.dtype)

        if cell == "lstm":
            def step(carry, g):
                h, c = carry
                i, f, gg, o = jnp.split(g + h @ w_hh.T + b_hh, 4, axis=-1)
                c = sigmoid(f) * c + sigmoid(i) * tanh(gg)
                h = sigmoid(o) * tanh(c)
                return (h, c), h
            carry = (h0, h0)
        elif cell == "gru":
            def step(h, g):
                gh = h @ w_hh.T + b_hh
                r = sigmoid(g[:, :H] + gh[:, :H])
                z = sigmoid(g[:, H:2 * H] + gh[:, H:2 * H])
                n = tanh(g[:, 2 * H:] + r * gh[:, 2 * H:])
                h = (1 - z) * n + z * h
                return h, h
            carry = h0
        else:
            def step(h, g):
                h = act(g + h @ w_hh.T + b_hh)
                return h, h
            carry = h0
        return jax.lax.scan(step, carry, gx)[1]
    return layer


def _problem(cell: str, T: int, B: int, H: int, seed: int):
    """NumPy float32 (x, w_ih, w_hh, b_ih, b_hh) with I = H, and dy."""
    G = fusedrnn.CELLS[cell]
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(H)  # torch.nn's initialisation range
    u = lambda *s: rng.uniform(-bound, bound, s).astype(np.float32)  # noqa: E731
    arrays = (rng.standard_normal((T, B, H)).astype(np.float32), u(G * H, H), u(G * H, H),
              u(G * H), u(G * H))
    return arrays, rng.standard_normal((T, B, H)).astype(np.float32)


_NAMES = ("x", "w_ih", "w_hh", "b_ih", "b_hh")


def _bind(jax, cell: str, arrays, dy, backward: bool):
    """{provider: (call, outputs)}: one timed call of each provider, and its results as a
    dict of NumPy arrays."""
    import jax.numpy as jnp  # noqa: PLC0415

    from . import jax as fj  # noqa: PLC0415 - imports jax

    dev = [jnp.asarray(a) for a in arrays]
    dy_dev = jnp.asarray(dy)
    layers = {_PEER: scan_layer(cell), "fusedrnn.jax": lambda *a: fj.rnn(cell, *a)[0]}
    binds = {}
    for name, f in layers.items():
        if backward:
            fn = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * dy_dev),
                                  argnums=tuple(range(len(dev)))))
            to_np = lambda gs: {n: np.asarray(g) for n, g in zip(_NAMES, gs)}  # noqa: E731
        else:
            fn = jax.jit(f)
            to_np = lambda y: {"y": np.asarray(y)}  # noqa: E731
        binds[name] = (lambda fn=fn: jax.block_until_ready(fn(*dev)), to_np)

    if backward:
        def direct():
            cache = fusedrnn.forward(cell, *arrays)[3]
            return fusedrnn.backward(cache, dy)
        binds["fusedrnn"] = (direct, lambda g: {n: g[n] for n in _NAMES})
    else:
        binds["fusedrnn"] = (lambda: fusedrnn.forward(cell, *arrays, training=False)[0],
                             lambda y: {"y": y})
    return binds


def run(args, out=None) -> int:
    """The JAX benchmark for parsed ``bench`` arguments (--cells, --shapes, --passes,
    --repeats, --min-sample-ms, --threads, --seed, --csv, --quick); returns the exit
    status."""
    out = out or sys.stdout
    try:
        import jax  # noqa: PLC0415 - only this mode imports jax
    except ImportError:
        print("error: --jax needs jax (pip install jax)", file=sys.stderr)
        return 2
    shapes = _bench.peer_shapes(args, QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if shapes is None:
        return 2
    repeats, min_sample_s = _bench.sampling(args)
    threads = args.threads or fusedrnn.get_num_threads()
    old = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(threads)
    print(f"fusedrnn {fusedrnn.__version__} JAX benchmark: jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; CPU {_bench.cpu_model()}; float32, I = H; "
          f"fusedrnn {threads} threads, XLA its own; median of {repeats} interleaved samples "
          f"of >= {min_sample_s * 1e3:g} ms", file=out)
    try:
        rows, failed = _bench.run_peer_grid(
            out, args.cells, shapes, args.passes,
            lambda *case: _run_case(jax, *case, repeats, min_sample_s, args.seed),
            _TABLE, _NUMERIC)
    finally:
        fusedrnn.set_num_threads(old)
    _print_summary(out, rows)
    if args.csv:
        _bench.write_csv(args.csv, rows, columns=_COLUMNS)
        print(f"CSV written to {args.csv}", file=out)
    return 1 if failed else 0


def _run_case(jax, cell, T, B, H, pass_, repeats, min_sample_s,
              seed) -> Tuple[List[_bench.DictRow], bool]:
    arrays, dy = _problem(cell, T, B, H, seed)
    binds = _bind(jax, cell, arrays, dy, pass_ == _bench.FORWARD_BACKWARD)
    outputs = {name: to_np(call()) for name, (call, to_np) in binds.items()}  # + warm-up
    err, where = _bench.rel_err(outputs["fusedrnn.jax"], outputs[_PEER])
    same = all(np.array_equal(outputs["fusedrnn.jax"][k], v)
               for k, v in outputs["fusedrnn"].items())
    check = ("ok" if err <= _bench.TOLERANCE["float32"] else f"MISMATCH({where})") if same \
        else "MISMATCH(vs fusedrnn)"
    timed = _bench.time_interleaved({n: binds[n][0] for n in _PROVIDERS}, repeats,
                                    min_sample_s)
    case = {"cell": cell, "T": T, "B": B, "H": H, "pass": pass_}
    return _bench.peer_rows(timed, case, check, _PEER, "speedup vs lax.scan"), check == "ok"


def _print_summary(out, rows: List[_bench.DictRow]) -> None:
    """Geometric means over the cases: fusedrnn.jax over jax.lax.scan, and fusedrnn.jax's
    time over fusedrnn's (the adapter's cost)."""
    for pass_ in _bench.PASSES:
        mine = {(r["cell"], r["T"], r["B"], r["H"]): r for r in rows
                if r["pass"] == pass_ and r["provider"] == "fusedrnn.jax"}
        direct = {(r["cell"], r["T"], r["B"], r["H"]): r for r in rows
                  if r["pass"] == pass_ and r["provider"] == "fusedrnn"}
        if not mine:
            continue
        gm = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
        vs_scan = gm([r["speedup vs lax.scan"] for r in mine.values()])
        cost = gm([mine[k]["ms"] / direct[k]["ms"] for k in mine])
        print(f"{pass_}: fusedrnn.jax {vs_scan:.2f}x jax.lax.scan's speed, {cost:.2f}x "
              f"fusedrnn's time (geometric means over {len(mine)} cases)", file=out)

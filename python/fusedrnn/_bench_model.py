"""``python -m fusedrnn bench --model``: a recurrent layer inside a model, as torch users
run it.

A layer timed alone says little about what a user of ``fusedrnn.torch`` gets: in a
model, other torch operators run between the layer's calls, and they leave torch's
threads (OpenMP) behind in a state that the layer then shares the cores with
(csrc/cpu/pool.h). This mode times a small language model, Embedding(V, H) -> the
recurrent layer (one layer, I = H) -> Linear(H, V), with ``torch.nn``'s layer and with
``fusedrnn.torch``'s (same weights), interleaved like the layer benchmark
(``_bench.time_interleaved``). Passes: forward under ``torch.no_grad()``, and forward
plus backward of the cross-entropy of next-token predictions. Each case is checked
first: outputs, and with backward the gradients, agree with torch.nn's.
"""

from __future__ import annotations

import sys
from typing import List, Tuple

import fusedrnn

from . import _bench

__all__ = ["DEFAULT_SHAPES", "VOCAB", "run"]

#: (T, B, H) of the default cases: a decoding step, small and mid batches
DEFAULT_SHAPES = [(1, 1, 256), (100, 8, 256), (100, 32, 256)]
#: vocabulary size of the model's embedding and output layer
VOCAB = 1000
#: torch.nn class of each cell
_TORCH_CLASS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}),
                "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
                "rnn_relu": ("RNN", {"nonlinearity": "relu"})}
_COLUMNS = ("cell", "T", "B", "H", "pass", "provider", "ms", "spread", "speedup vs torch",
            "check")


#: the table (_bench.table_header / table_row): (title, width, format) per column
_TABLE, _NUMERIC = _bench.peer_table(_COLUMNS, (9, 5, 5, 6, 17, 15, 10, 7, 17, 12))


def _models(torch, cell: str, H: int, seed: int):
    """(torch.nn model, fusedrnn.torch model) with the same weights."""
    from . import torch as fusedrnn_torch  # noqa: PLC0415 - imports torch

    name, extra = _TORCH_CLASS[cell]

    class Model(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, H)
            self.rnn = rnn
            self.out = torch.nn.Linear(H, VOCAB)

        def forward(self, tokens):
            y, _ = self.rnn(self.emb(tokens))
            return self.out(y)

    torch.manual_seed(seed)
    ref = Model(getattr(torch.nn, name)(H, H, **extra))
    fused = Model(getattr(fusedrnn_torch, name)(H, H, **extra))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _bind(torch, model, tokens, targets, backward: bool):
    """(call, outputs): one timed step of the model; its outputs as NumPy arrays."""
    if not backward:
        def call():
            with torch.no_grad():
                return model(tokens)

        return call, lambda logits: {"logits": logits.numpy()}

    params = list(model.parameters())

    def call():
        for p in params:
            p.grad = None
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        return logits

    def outputs(logits):
        named = {"logits": logits.detach().numpy()}
        named.update({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
        return named

    return call, outputs


def run(args, out=None) -> int:
    """The model benchmark for parsed ``bench`` arguments (--cells, --shapes, --passes,
    --repeats, --min-sample-ms, --threads, --seed, --csv); returns the exit status."""
    out = out or sys.stdout
    torch = _bench.import_torch()
    if torch is None:
        print("error: --model needs torch (pip install torch)", file=sys.stderr)
        return 2
    shapes = _bench.peer_shapes(args, DEFAULT_SHAPES)
    if shapes is None:
        return 2
    repeats, min_sample_s = _bench.sampling(args)
    threads = args.threads or fusedrnn.get_num_threads()
    old = fusedrnn.get_num_threads(), torch.get_num_threads()
    fusedrnn.set_num_threads(threads)
    torch.set_num_threads(threads)
    print(f"fusedrnn {fusedrnn.__version__} model benchmark: Embedding({VOCAB}, H) -> layer "
          f"-> Linear(H, {VOCAB}); float32, {threads} threads (torch and fusedrnn), torch "
          f"{torch.__version__}; median of {repeats} interleaved samples of >= "
          f"{min_sample_s * 1e3:g} ms", file=out)
    try:
        rows, failed = _bench.run_peer_grid(
            out, args.cells, shapes, args.passes,
            lambda *case: _run_case(torch, *case, repeats, min_sample_s, args.seed),
            _TABLE, _NUMERIC)
    finally:
        fusedrnn.set_num_threads(old[0])
        torch.set_num_threads(old[1])
    if args.csv:
        _bench.write_csv(args.csv, rows, columns=_COLUMNS)
        print(f"CSV written to {args.csv}", file=out)
    return 1 if failed else 0


def _run_case(torch, cell, T, B, H, pass_, repeats, min_sample_s,
              seed) -> Tuple[List[_bench.DictRow], bool]:
    backward = pass_ == _bench.FORWARD_BACKWARD
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (T, B), generator=gen)
    targets = torch.randint(0, VOCAB, (T, B), generator=gen)
    ref, fused = _models(torch, cell, H, seed)
    calls, outputs = {}, {}
    for name, model in (("torch", ref), ("fusedrnn.torch", fused)):
        call, to_arrays = _bind(torch, model, tokens, targets, backward)
        outputs[name] = to_arrays(call())  # the check, and a warm-up
        calls[name] = call
    err, where = _bench.rel_err(outputs["fusedrnn.torch"], outputs["torch"])
    check = "ok" if err <= _bench.TOLERANCE["float32"] else f"MISMATCH({where})"
    timed = _bench.time_interleaved(calls, repeats, min_sample_s)
    case = {"cell": cell, "T": T, "B": B, "H": H, "pass": pass_}
    return _bench.peer_rows(timed, case, check, "torch", "speedup vs torch"), check == "ok"

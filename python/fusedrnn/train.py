"""``python -m fusedrnn train``: train a recurrent model on a synthetic task.

With no options it trains the classic Elman network

    h_t = tanh(W_hh h_{t-1} + W_ih x_t + b),    y_t = W_hy h_t + b_y

on next-step prediction of sine waves, with a squared-error loss and Adam, and
prints the loss per epoch, the throughput and the final loss.  Tasks:

- ``sine`` (default): x_t = sin(ω t + φ) with ω, φ random per row; predict
  x_{t+1} at every step (MSE).  Baseline: predicting 0 gives MSE 0.5.
- ``adding`` (Hochreiter & Schmidhuber 1997): two input channels, values
  uniform in [0, 1) and a marker that is 1 at one step of the first half and
  one of the second half; predict the sum of the two marked values after the
  last step (MSE).  Baseline: predicting 1 gives MSE 1/6 ≈ 0.167.
- ``copy`` (copy memory, Arjovsky et al. 2016): K = 10 symbols from 8, then
  T - 1 blanks and a delimiter, then K blanks during which the model must
  replay the symbols (cross-entropy per step; length T + 2K, ``--seq-len`` is
  the delay T).  Baseline: blanks then uniform guesses, loss
  K log 8 / (T + 2K); chance accuracy on the replayed symbols 1/8.

Batches are drawn fresh from a seeded generator at every step (an endless data
stream); an *epoch* is ``--steps / --epochs`` steps, after which the mean
training loss and the loss on a fixed held-out batch are printed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

import fusedrnn
from . import _cli, models, optim

__all__ = ["add_arguments", "run", "TASKS", "Task", "Trainer"]


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A synthetic sequence task: how to draw a batch and score predictions."""

    name: str
    input_size: int
    output_size: int
    output: str  # "sequence" (an output per step) or "last" (one per row)
    loss: str  # "mse" or "ce"
    default_seq_len: int
    summary: str
    sample: Callable  # (rng, B, T, dtype) -> (x [T', B, I], target)
    baseline: Callable  # T -> (loss of the trivial solution, what it is)

    def loss_fn(self):
        return models.mse_loss if self.loss == "mse" else models.cross_entropy

    def metrics(self, out, target) -> Dict[str, float]:
        """Task-specific scores besides the loss."""
        if self.name == "adding":  # fraction of rows within 0.04 of the sum
            return {"acc(|err|<0.04)": float(np.mean(np.abs(out[:, 0] - target[:, 0]) < 0.04))}
        if self.name == "copy":  # accuracy on the replayed symbols
            K = COPY_SYMBOLS
            return {"copy acc": models.accuracy(out[-K:], target[-K:])}
        return {}

    def steps_per_sequence(self, T):
        return T + 2 * COPY_SYMBOLS if self.name == "copy" else T


def _sine(rng, B, T, dtype):
    omega = rng.uniform(0.1, 0.4, size=(1, B, 1))  # radians per step
    phase = rng.uniform(0.0, 2 * np.pi, size=(1, B, 1))
    t = np.arange(T + 1, dtype=np.float64)[:, None, None]
    wave = np.sin(omega * t + phase)  # [T+1, B, 1]
    return wave[:-1].astype(dtype), wave[1:].astype(dtype)


def _adding(rng, B, T, dtype):
    if T < 2:
        raise ValueError("--seq-len must be at least 2 for the adding task")
    values = rng.uniform(0.0, 1.0, size=(T, B))
    marker = np.zeros((T, B))
    half = T // 2
    first = rng.integers(0, half, size=B)
    second = rng.integers(half, T, size=B)
    rows = np.arange(B)
    marker[first, rows] = 1.0
    marker[second, rows] = 1.0
    x = np.stack([values, marker], axis=-1).astype(dtype)  # [T, B, 2]
    target = (values[first, rows] + values[second, rows])[:, None].astype(dtype)  # [B, 1]
    return x, target


#: copy task: symbols to remember, their alphabet (1..8), blank 0, delimiter 9
COPY_SYMBOLS, COPY_ALPHABET = 10, 8


def _copy(rng, B, T, dtype):
    K, A = COPY_SYMBOLS, COPY_ALPHABET
    if T < 1:
        raise ValueError("--seq-len (the copy delay) must be at least 1")
    n = T + 2 * K
    data = rng.integers(1, A + 1, size=(K, B))
    tokens = np.zeros((n, B), dtype=np.int64)
    tokens[:K] = data
    tokens[K + T - 1] = A + 1  # delimiter: start replaying
    target = np.zeros((n, B), dtype=np.int64)
    target[-K:] = data
    x = np.zeros((n, B, A + 2), dtype=dtype)  # one-hot
    np.put_along_axis(x, tokens[..., None], 1.0, axis=-1)
    return x, target


TASKS: Dict[str, Task] = {
    "sine": Task("sine", 1, 1, "sequence", "mse", 50,
                 "next-step prediction of sine waves (random frequency and phase)",
                 _sine, lambda T: (0.5, "predict 0")),
    "adding": Task("adding", 2, 1, "last", "mse", 100,
                   "adding problem: sum of the two marked values",
                   _adding, lambda T: (1 / 6, "predict 1")),
    "copy": Task("copy", COPY_ALPHABET + 2, COPY_ALPHABET + 1, "sequence", "ce", 100,
                 f"copy memory: replay {COPY_SYMBOLS} symbols after a delay of T steps",
                 _copy, lambda T: (COPY_SYMBOLS * math.log(COPY_ALPHABET) / (T + 2 * COPY_SYMBOLS),
                                   "blanks, then uniform guesses")),
}


# --------------------------------------------------------------------------
# Progress display: tqdm when installed, else a small built-in text bar
# --------------------------------------------------------------------------

def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _TextBar:
    """A one-line progress bar on a terminal stream (``\\r`` updates, 10 Hz at most);
    cleared on close, like tqdm with ``leave=False``."""

    def __init__(self, total, stream):
        self.total, self.n, self.stream = total, 0, stream
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.postfix = ""
        self.width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def update(self, n=1):
        self.n += n
        now = time.perf_counter()
        if now - self.last >= 0.1 or self.n >= self.total:
            self.last = now
            self._draw(now)

    def set_postfix_str(self, s):
        self.postfix = s

    def _draw(self, now):
        frac = self.n / self.total if self.total else 1.0
        fill = int(round(frac * 24))
        elapsed = now - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        line = (f"[{'#' * fill}{'.' * (24 - fill)}] {self.n}/{self.total} "
                f"{100 * frac:3.0f}% {rate:6.1f} it/s eta {eta:4.0f}s {self.postfix}")
        self.stream.write("\r" + line[:self.width].ljust(self.width))
        self.stream.flush()

    def _clear(self):
        self.stream.write("\r" + " " * self.width + "\r")
        self.stream.flush()

    def write(self, line):
        self._clear()
        print(line, flush=True)
        self._draw(time.perf_counter())

    def close(self):
        self._clear()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def write(self, line):
        print(line, flush=True)

    def close(self):
        pass


def _progress(mode, total):
    """The progress display for ``--progress`` (auto: tqdm if installed, else the
    text bar on a terminal, else none)."""
    if mode == "auto":
        mode = "tqdm" if _have_tqdm() else ("text" if sys.stderr.isatty() else "none")
    if mode == "tqdm":
        if not _have_tqdm():
            raise ValueError("--progress tqdm: tqdm is not installed "
                             "(pip install 'fusedrnn[train]' or pip install tqdm)")
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
        return bar
    if mode == "text":
        return _TextBar(total, sys.stderr)
    return _NoBar()


# --------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------

@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    metrics: Dict[str, float]
    grad_norm: float
    seconds: float
    sequences: int
    updates: int
    timesteps: int


class Trainer:
    """One model, optimizer and task; ``train_step`` draws a batch and updates once
    (or once per chunk with ``tbptt``).

    The batch is split into ``accum`` micro-batches whose gradients are summed with
    weight 1/accum before one update (the same update as the whole batch).
    """

    def __init__(self, task: Task, model: models.RNNModel, opt: optim.Optimizer, *,
                 seq_len: int, batch: int, clip: Optional[float] = None,
                 tbptt: Optional[int] = None, accum: int = 1, seed: int = 0):
        if tbptt is not None and model.bidirectional:
            raise ValueError("--tbptt needs a unidirectional model (drop --bidirectional)")
        if batch % accum:
            raise ValueError(f"--batch ({batch}) must be a multiple of --accum ({accum})")
        self.task, self.model, self.opt = task, model, opt
        self.seq_len, self.batch, self.clip = seq_len, batch, clip
        self.tbptt, self.accum = tbptt, accum
        data_seq, val_seq = np.random.SeedSequence([seed, 1]).spawn(2)
        self.rng = np.random.default_rng(data_seq)
        self.val_x, self.val_target = task.sample(np.random.default_rng(val_seq),
                                                  max(256, batch), seq_len, model.dtype)
        self.loss_fn = task.loss_fn()
        self.updates = 0
        self.grad_norms = []

    def _update(self, grads):
        if self.clip is not None:
            norm = optim.clip_grad_norm(grads, self.clip)
        else:
            norm = optim.global_norm(grads)
        self.grad_norms.append(norm)
        if math.isfinite(norm):
            self.opt.step(grads)
            self.updates += 1

    def train_step(self) -> float:
        """One batch: forward, loss, backward, (clip,) update.  Returns the loss."""
        x, target = self.task.sample(self.rng, self.batch, self.seq_len, self.model.dtype)
        model = self.model
        if self.tbptt is not None:
            r = models.truncated_bptt(model, x, target, self.loss_fn, self.tbptt, cut=True,
                                      on_chunk=self._update)
            return r.loss
        if self.accum == 1:
            out, _, _, cache = model.forward(x)
            loss, dout = self.loss_fn(out, target)
            grads, _ = model.backward(cache, dout)
            self._update(grads)
            return loss
        acc, total = optim.GradientAccumulator(), 0.0
        mb = self.batch // self.accum
        for k in range(self.accum):
            rows = slice(k * mb, (k + 1) * mb)
            out, _, _, cache = model.forward(x[:, rows])
            loss, dout = self.loss_fn(out, target[rows] if self.task.output == "last"
                                      else target[:, rows])
            grads, _ = model.backward(cache, dout)
            acc.add(grads, 1.0 / self.accum)
            total += loss / self.accum
        self._update(acc.grads)
        return total

    def evaluate(self) -> Tuple[float, Dict[str, float]]:
        out = self.model.predict(self.val_x)
        loss, _ = self.loss_fn(out, self.val_target)
        return loss, self.task.metrics(out, self.val_target)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

_positive_int, _nonneg_int = _cli.positive_int, _cli.nonneg_int
_positive_float, _nonneg_float = _cli.positive_float, _cli.nonneg_float


def _dropout(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to an (empty) argument parser."""
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=sorted(TASKS), default="sine",
                   help="sine: next-step sine prediction (default); adding: the adding "
                        "problem; copy: copy memory (long-range)")
    g.add_argument("--seq-len", type=_positive_int, metavar="T",
                   help="sequence length T (copy: the delay; the sequence is T+20 long); "
                        "default: sine 50, adding 100, copy 100")
    g.add_argument("--batch", type=_positive_int, default=32, metavar="B",
                   help="sequences per step (default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=list(fusedrnn.CELLS), default="rnn_tanh",
                   help="recurrent cell (default: %(default)s, the classic Elman network)")
    g.add_argument("--hidden", type=_positive_int, default=32, metavar="H",
                   help="hidden size per direction (default: %(default)s)")
    g.add_argument("--layers", type=_positive_int, default=1, metavar="L",
                   help="stacked layers (default: %(default)s)")
    g.add_argument("--bidirectional", action="store_true",
                   help="add a backward-in-time direction to every layer")
    g.add_argument("--dropout", type=_dropout, default=0.0, metavar="P",
                   help="dropout between layers (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="element type (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_nonneg_int, default=1000,
                   help="training steps, one fresh batch each (default: %(default)s; 0 only "
                        "evaluates, e.g. with --load)")
    g.add_argument("--epochs", type=_positive_int, default=10,
                   help="report the loss this many times, every steps/epochs steps "
                        "(default: %(default)s)")
    g.add_argument("--optimizer", choices=optim.OPTIMIZERS, default="adam",
                   help="sgd; momentum, nesterov (SGD with momentum 0.9); adam; adamw "
                        "(default: %(default)s)")
    g.add_argument("--lr", type=_positive_float,
                   help="learning rate (default: 0.01 for adam/adamw, 0.1 for SGD variants)")
    g.add_argument("--weight-decay", type=_nonneg_float, metavar="L",
                   help="L2 (sgd/adam) or decoupled (adamw) weight decay "
                        "(default: 0, adamw 0.01)")
    g.add_argument("--clip", type=_positive_float, metavar="NORM",
                   help="clip the global gradient norm to NORM (default: no clipping)")
    g.add_argument("--tbptt", type=_positive_int, metavar="K",
                   help="truncated BPTT: backpropagate through chunks of K steps, carry the "
                        "state forward, update after every chunk")
    g.add_argument("--accum", type=_positive_int, default=1, metavar="K",
                   help="split each batch into K micro-batches and accumulate their "
                        "gradients (same update, less memory; default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds initialisation, data and dropout (default: %(default)s)")
    g = p.add_argument_group("files and output")
    g.add_argument("--save", metavar="PATH", help="write the trained parameters (npz)")
    g.add_argument("--load", metavar="PATH",
                   help="start from parameters saved with --save (the model options must "
                        "match the file)")
    g.add_argument("--threads", type=_positive_int,
                   help="threads for fusedrnn (default: fusedrnn.get_num_threads())")
    g.add_argument("--progress", choices=("auto", "tqdm", "text", "none"), default="auto",
                   help="progress bar: tqdm when installed, else a text bar on a terminal "
                        "(default: %(default)s)")


def _fmt_metrics(metrics):
    return "".join(f"  {k} {v:.3f}" for k, v in metrics.items())


def run(args: argparse.Namespace) -> int:
    """Run ``train`` with parsed arguments; returns the exit status."""
    task = TASKS[args.task]
    T = args.seq_len or task.default_seq_len
    lr = args.lr or (0.01 if args.optimizer in ("adam", "adamw") else 0.1)
    threads_before = fusedrnn.get_num_threads()
    if args.threads:
        fusedrnn.set_num_threads(args.threads)
    try:
        model = models.RNNModel(args.cell, task.input_size, args.hidden, task.output_size,
                                args.layers, bidirectional=args.bidirectional,
                                dropout=args.dropout, output=task.output, dtype=args.dtype,
                                seed=args.seed)
        if args.load:
            try:
                model.load(args.load)
            except (OSError, ValueError) as exc:
                print(f"fusedrnn train: cannot load --load {args.load}: {exc}", file=sys.stderr)
                return 2
        opt = optim.make_optimizer(args.optimizer, model.params, lr,
                                   weight_decay=args.weight_decay)
        try:
            trainer = Trainer(task, model, opt, seq_len=T, batch=args.batch, clip=args.clip,
                              tbptt=args.tbptt, accum=args.accum, seed=args.seed)
        except ValueError as exc:
            print(f"fusedrnn train: {exc}", file=sys.stderr)
            return 2
        return _train(args, task, model, opt, trainer, T, lr)
    finally:
        fusedrnn.set_num_threads(threads_before)


def _train(args, task, model, opt, trainer, T, lr) -> int:
    steps, epochs = args.steps, min(args.epochs, max(args.steps, 1))
    Tn = task.steps_per_sequence(T)
    base, base_what = task.baseline(T)
    extra = []
    if args.clip:
        extra.append(f"clip {args.clip:g}")
    if args.tbptt:
        extra.append(f"tbptt {args.tbptt}")
    if args.accum > 1:
        extra.append(f"accum {args.accum}")
    print(f"task {task.name}: {task.summary}; T={Tn}, batch {args.batch}, {task.loss} loss "
          f"(baseline {base:.4f}: {base_what})")
    print(f"model {model.cell} H={model.hidden_size} layers={model.num_layers}"
          f"{' bidirectional' if model.bidirectional else ''}, output {task.output}, "
          f"{model.num_parameters} parameters, {model.dtype}; {args.optimizer} lr {lr:g}"
          f"{', ' + ', '.join(extra) if extra else ''}; seed {args.seed}; "
          f"{fusedrnn.get_num_threads()} threads")

    val, metrics = trainer.evaluate()
    print(f"epoch {0:>3}/{epochs}  val loss {val:.5f}{_fmt_metrics(metrics)}")
    bar = _progress(args.progress, steps)
    bounds = [round(steps * (e + 1) / epochs) for e in range(epochs)] if steps else []
    train_time, done = 0.0, 0
    history = []
    try:
        for epoch, end in enumerate(bounds, 1):
            losses, t0, u0, g0 = [], time.perf_counter(), trainer.updates, len(trainer.grad_norms)
            while done < end:
                with np.errstate(over="ignore", invalid="ignore"):  # reported below
                    loss = trainer.train_step()
                if not math.isfinite(loss):
                    bar.close()
                    print(f"fusedrnn train: the loss became {loss} at step {done + 1}; "
                          f"try a smaller --lr or --clip", file=sys.stderr)
                    return 1
                losses.append(loss)
                done += 1
                bar.set_postfix_str(f"loss {loss:.4f}")
                bar.update(1)
            dt = time.perf_counter() - t0
            train_time += dt
            with np.errstate(over="ignore", invalid="ignore"):
                val, metrics = trainer.evaluate()
            n = len(losses)
            norms = trainer.grad_norms[g0:]
            st = EpochStats(epoch, float(np.mean(losses)) if losses else float("nan"), val,
                            metrics, float(np.mean(norms)) if norms else float("nan"), dt,
                            n * args.batch, trainer.updates - u0, n * args.batch * Tn)
            history.append(st)
            bar.write(f"epoch {epoch:>3}/{epochs}  train loss {st.train_loss:.5f}  "
                      f"val loss {st.val_loss:.5f}{_fmt_metrics(metrics)}  "
                      f"|grad| {st.grad_norm:.3g}  {st.sequences / dt:,.0f} seq/s  "
                      f"{st.updates / dt:,.1f} steps/s  {st.timesteps / dt:,.0f} timesteps/s")
    finally:
        bar.close()

    if steps:
        seqs = steps * args.batch
        print(f"throughput: {seqs / train_time:,.0f} sequences/s, "
              f"{trainer.updates / train_time:,.1f} steps/s (updates), "
              f"{seqs * Tn / train_time:,.0f} timesteps/s over {train_time:.2f} s of training")
    val, metrics = trainer.evaluate()
    print(f"final loss: {val:.5f} (held-out batch of {trainer.val_x.shape[1]}; baseline "
          f"{base:.4f}){_fmt_metrics(metrics)}")
    if args.save:
        try:
            model.save(args.save)
        except OSError as exc:
            print(f"fusedrnn train: cannot write --save {args.save}: {exc}", file=sys.stderr)
            return 2
        print(f"saved {model.num_parameters} parameters to {args.save}")
    return 0

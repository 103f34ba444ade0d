"""Command line of fusedrnn: ``python -m fusedrnn <command> [options]`` (or ``fusedrnn ...``).

Commands:
    train   train an RNN/LSTM/GRU model on a synthetic task (docs/training.md)
    bench   time fusedrnn against its NumPy reference and torch.nn (see bench/README.md);
            ``bench --device cuda``: its CUDA backend against torch.nn/cuDNN on a GPU

Each command is a subparser registered in ``_COMMANDS``: a function that adds the
parser and its options, and sets ``func`` (called with the parsed arguments, it
returns the exit status). A new command (``train``, say) is one more entry there.
Command modules are imported only when their command is set up, so
``import fusedrnn`` never pays for them (and never imports torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _add_bench(subparsers) -> None:
    from . import _bench, _bench_cuda

    p = subparsers.add_parser(
        "bench",
        help="benchmark fusedrnn against the NumPy reference and torch.nn (--device cuda: "
             "on a GPU, against cuDNN)",
        description="Time fusedrnn.forward/backward against fusedrnn.reference and torch.nn "
                    "(if installed) over a grid of cells, shapes and passes; prints a table "
                    "and writes a CSV. See bench/README.md. With --device cuda: fusedrnn's "
                    "CUDA backend against torch.nn on the GPU (cuDNN), see "
                    "fusedrnn/_bench_cuda.py.")
    _bench.add_arguments(p)
    _bench_cuda.add_arguments(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    """``bench``: the CPU benchmark, or the GPU one with ``--device cuda``."""
    if getattr(args, "device", "cpu") == "cuda":
        from . import _bench_cuda

        return _bench_cuda.run(args)
    from . import _bench

    return _bench.run(args)


def _add_train(subparsers) -> None:
    from . import train

    p = subparsers.add_parser(
        "train",
        help="train an RNN/LSTM/GRU model on a synthetic task (default: the classic Elman "
             "RNN on sine waves)",
        description="Train a recurrent model (stacked, optionally bidirectional, with a dense "
                    "output layer) on NumPy arrays with fusedrnn's kernels: sine-wave regression "
                    "(default), the adding problem or the copy-memory task. Prints the loss per "
                    "epoch, the throughput and the final loss. See docs/training.md.")
    train.add_arguments(p)
    p.set_defaults(func=train.run)


#: the subcommands, in the order ``--help`` lists them
_COMMANDS = (_add_train, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m fusedrnn",
        description="fusedrnn: fused CPU kernels for Elman RNN, LSTM and GRU layers.")
    parser.add_argument("--version", action="version", version=f"fusedrnn {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fusedrnn`` and the ``fusedrnn`` script; returns the exit status.

    Without a command it prints the available commands and returns 0.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout piped into a reader that quit early (``| head``)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""argparse value types shared by the command-line tools (train, bench)."""

from __future__ import annotations

import argparse
import math


def _number(convert, ok, what):
    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda n: n >= 1, "a positive integer")
nonneg_int = _number(int, lambda n: n >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and not math.isinf(v), "a positive number")
nonneg_float = _number(float, lambda v: v >= 0 and not math.isinf(v), "a number >= 0")

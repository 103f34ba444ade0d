"""How well `auto`'s rule picks between the CUDA algorithms, from a benchmark's CSV.

    python bench/rule_report.py bench/results/cuda-<gpu>.csv [--within 0.05]

Reads the CSV that ``python -m fusedrnn bench --device cuda`` writes and, per
case (cell, T, B, H, dtype, pass), compares the providers' median times:

- the fastest fusedrnn algorithm, and how much slower `auto`'s pick was
  (``auto/best``, from the picked algorithm's own row); a miss is a case
  where that is more than ``--within``;
- where the provider ran, what benchmark mode (``fusedrnn.benchmark``) picked
  and its time;
- the best algorithm against torch.nn (cuDNN) and `auto` against it, with the
  issue's targets: at least 1.0x everywhere, 2x at B <= 8.

Then, per cell and dtype, a map of the faster algorithm (P: persistent,
S: standard, forward / forward+backward) over B x H: what a rule has to draw.
Only reads the CSV; needs no GPU and nothing beyond the standard library.
"""

import argparse
import csv
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

ALGO_PROVIDERS = {"standard": "fusedrnn.standard", "persistent": "fusedrnn.persistent"}
PASS_SHORT = {"forward": "fwd", "forward+backward": "f+b"}


def load(path: str) -> Dict[Tuple, Dict[str, dict]]:
    """case -> provider -> row, for rows with a time and a passing check."""
    cases: Dict[Tuple, Dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                ms = float(r["ms"])
            except (TypeError, ValueError):
                continue
            if ms != ms or not r.get("check", "ok").startswith("ok"):  # NaN, failed, mismatch
                continue
            key = (r["cell"], int(r["T"]), int(r["B"]), int(r["H"]), r["dtype"], r["pass"])
            cases[key][r["provider"]] = {**r, "ms": ms}
    return cases


def analyse(cases, within: float) -> List[dict]:
    """One dict per case that has an auto row and at least one algorithm's row."""
    out = []
    for key in sorted(cases, key=lambda k: (k[4], k[0], k[5], k[2], k[3])):
        rows = cases[key]
        auto = rows.get("fusedrnn")
        times = {a: rows[p]["ms"] for a, p in ALGO_PROVIDERS.items() if p in rows}
        if auto is None or not times:
            continue
        best = min(times, key=times.get)
        pick = auto["algo"].split(":", 1)[-1]
        torch_ms: Optional[float] = rows["torch"]["ms"] if "torch" in rows else None
        bench = rows.get("fusedrnn.benchmark")
        # the rule's quality: the picked algorithm's own row where it ran (the same
        # algorithm timed twice differs by noise), else auto's
        pick_ms = times.get(pick, auto["ms"])
        d = {
            "case": key, "pick": pick, "auto_ms": auto["ms"], "times": times, "best": best,
            "auto_over_best": pick_ms / times[best], "torch_ms": torch_ms,
            "bench_algo": bench["algo"] if bench else None,
            "bench_ms": bench["ms"] if bench else None,
        }
        d["miss"] = d["auto_over_best"] > 1 + within
        d["best_vs_torch"] = torch_ms / times[best] if torch_ms else None
        d["auto_vs_torch"] = torch_ms / auto["ms"] if torch_ms else None
        d["target"] = 2.0 if key[2] <= 8 else 1.0
        out.append(d)
    return out


def fmt(x: Optional[float], spec: str) -> str:
    """x formatted by spec, or "-" in the same width when there is none."""
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))


def report(results: List[dict], within: float, out=sys.stdout) -> None:
    print(f"{'cell':9}{'B':>4}{'H':>6}  {'dtype':9}{'pass':5} {'standard':>9}{'persist.':>9}"
          f"  {'best':11}{'auto pick':11}{'auto/best':>9}  {'benchmark':24}{'torch':>8}"
          f"{'best/t':>8}{'auto/t':>8}", file=out)
    for d in results:
        cell, T, B, H, dtype, pass_ = d["case"]
        t = d["times"]
        bench = (f"{d['bench_algo']} {d['bench_ms']:.3f}" if d["bench_algo"] else "-")
        flag = " MISS" if d["miss"] else ""
        below = d["auto_vs_torch"] is not None and d["auto_vs_torch"] < d["target"]
        print(f"{cell:9}{B:>4}{H:>6}  {dtype:9}{PASS_SHORT.get(pass_, pass_):5} "
              f"{fmt(t.get('standard'), '9.3f')}{fmt(t.get('persistent'), '9.3f')}"
              f"  {d['best']:11}{d['pick']:11}{d['auto_over_best']:9.2f}  {bench:24}"
              f"{fmt(d['torch_ms'], '8.3f')}{fmt(d['best_vs_torch'], '8.2f')}"
              f"{fmt(d['auto_vs_torch'], '8.2f')}{flag}{' <target' if below else ''}", file=out)
    n = len(results)
    misses = [d for d in results if d["miss"]]
    print(file=out)
    print(f"auto's pick within {within:.0%} of the faster algorithm: {n - len(misses)} of {n}",
          file=out)
    if misses:
        worst = max(misses, key=lambda d: d["auto_over_best"])
        print(f"worst miss: {' '.join(map(str, worst['case']))}: {worst['pick']} took "
              f"{worst['auto_over_best']:.2f}x {worst['best']}'s time", file=out)
    with_torch = [d for d in results if d["auto_vs_torch"] is not None]
    below1 = [d for d in with_torch if d["auto_vs_torch"] < 1.0]
    below_t = [d for d in with_torch if d["auto_vs_torch"] < d["target"]]
    best_below1 = [d for d in with_torch if d["best_vs_torch"] < 1.0]
    print(f"auto slower than torch: {len(below1)} of {len(with_torch)}; below the target "
          f"(1x, 2x at B <= 8): {len(below_t)}; even the faster algorithm slower than torch: "
          f"{len(best_below1)}", file=out)
    bench = [d for d in results if d["bench_ms"] is not None]
    if bench:
        slow = [d for d in bench if d["bench_ms"] > (1 + within) * d["times"][d["best"]]]
        print(f"benchmark mode within {within:.0%} of the faster algorithm: "
              f"{len(bench) - len(slow)} of {len(bench)}", file=out)
    print_maps(results, out)


def print_maps(results: List[dict], out) -> None:
    """Per cell and dtype: the faster algorithm over B (rows) x H (columns)."""
    grid = defaultdict(dict)
    for d in results:
        cell, T, B, H, dtype, pass_ = d["case"]
        grid[(cell, dtype)].setdefault((B, H), {})[pass_] = d["best"][0].upper()
    for (cell, dtype), cells in grid.items():
        Bs = sorted({b for b, _ in cells})
        Hs = sorted({h for _, h in cells})
        print(f"\nfaster algorithm, {cell} {dtype} (forward/forward+backward; P persistent, "
              f"S standard)", file=out)
        print("      B" + "".join(f"{'H=' + str(h):>9}" for h in Hs), file=out)
        for b in Bs:
            row = []
            for h in Hs:
                p = cells.get((b, h), {})
                row.append(f"{p.get('forward', '-')}/{p.get('forward+backward', '-')}")
            print(f"{b:>7}" + "".join(f"{r:>9}" for r in row), file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="CSV files of python -m fusedrnn bench --device cuda")
    ap.add_argument("--within", type=float, default=0.05,
                    help="a pick slower than the faster algorithm by more than this is a miss")
    args = ap.parse_args(argv)
    cases = defaultdict(dict)
    for path in args.csv:
        for k, v in load(path).items():
            cases[k].update(v)
    results = analyse(cases, args.within)
    if not results:
        print("rule_report: no case with both auto's and an algorithm's time", file=sys.stderr)
        return 1
    report(results, args.within)
    return 0


if __name__ == "__main__":
    sys.exit(main())

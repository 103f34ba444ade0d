"""How many blocks the persistent kernels should use, and how they should meet:
a sweep for a GPU.

By default the persistent kernels give each of the device's multiprocessors a
block, so a block owns U = ceil(H / SMs) hidden units. Fewer, larger blocks
meet at the per-step grid barrier in fewer numbers and stage the state fewer
times, at the price of more products per block. This script times the
persistent kernels with FUSEDRNN_CUDA_PERSISTENT_UNITS (at least that many
units per block) at a few values, and in cluster mode
(FUSEDRNN_CUDA_PERSISTENT_CLUSTER=1: one cluster of up to 8 blocks that pass
the state through distributed shared memory), next to the standard algorithm
and torch.nn (cuDNN), on the benchmark's inputs, interleaved, median of the
repeats, and checks every variant against torch.nn.

    python bench/persistent_units.py [--out DIR] [--units 1,2,4,8,16] [--quick]

Writes persistent-units-<gpu>.txt (and prints it). Needs torch with CUDA and
fusedrnn built with its CUDA extension; exits with status 2 without a GPU.
"""

import argparse
import os
import sys
from typing import Dict, List

import fusedrnn
from fusedrnn import _bench_cuda as bc

KNOB = "FUSEDRNN_CUDA_PERSISTENT_UNITS"
CLUSTER = "FUSEDRNN_CUDA_PERSISTENT_CLUSTER"


def with_env(env: Dict[str, str], fn):
    """fn, called with the environment variables env set (and removed after)."""
    def run(*a):
        os.environ.update(env)
        try:
            return fn(*a)
        finally:
            for k in env:
                os.environ.pop(k, None)
    return run


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--units", default="1,2,4,8,16")
    ap.add_argument("--quick", action="store_true", help="two cases, for a smoke test")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("persistent_units: needs torch", file=sys.stderr)
        return 2
    if not (torch.cuda.is_available() and fusedrnn.cuda_available()):
        print(f"persistent_units: no GPU ({fusedrnn.cuda_status()})", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    from fusedrnn import _device

    dev = torch.device("cuda")
    units = [int(u) for u in args.units.split(",")]
    cases = [(c, b, h) for c in ("lstm", "gru", "rnn_tanh") for b in (1, 8, 64)
             for h in (256, 512, 1024)]
    if args.quick:
        cases = [("lstm", 1, 256), ("rnn_tanh", 8, 256)]
    name = torch.cuda.get_device_name(dev)
    lines = [f"persistent kernels' units per block ({KNOB}) and cluster mode on {name}, fusedrnn "
             f"{fusedrnn.__version__}, T = 100, I = H, float32; ms, median of "
             f"{args.repeats}; x: torch.nn's time over this one",
             f"{'cell':9} {'B':>3} {'H':>5} {'pass':17} {'variant':12} {'U':>3} {'blocks':>6} "
             f"{'ms':>8} {'x torch':>8}  check"]
    print("\n".join(lines), flush=True)
    for cell, B, H in cases:
        for pass_ in (bc.FORWARD, bc.FORWARD_BACKWARD):
            case = bc.Case(cell, 100, B, H, H, "float32", pass_)
            prob = bc.make_problem(torch, cell, 100, B, H, H, "float32", 0, dev)
            calls: Dict[str, object] = {}
            outs: Dict[str, object] = {}
            layout, seen = {}, set()
            variants = {f"units>={u}": {KNOB: str(u)} for u in units}
            variants["cluster"] = {CLUSTER: "1"}
            for k, env in variants.items():
                lay = with_env(env, _device._cuda.persistent_layout)(cell, "float32", B, H, False,
                                                                      dev.index or 0)
                key = (lay["U"], lay["blocks"], lay["cluster"])
                if not lay["ok"] or (k == "cluster" and not lay["cluster"]) or key in seen:
                    continue  # (a variant with the same layout as one before: not again)
                seen.add(key)
                layout[k] = (lay["U"], lay["blocks"])
                call, outputs = bc.bind_fusedrnn(case, prob, "persistent")
                calls[k] = with_env(env, call)
                outs[k] = outputs
            call, outputs = bc.bind_fusedrnn(case, prob, "standard")
            calls["standard"], outs["standard"] = call, outputs
            tcall, toutputs = bc.bind_torch(torch, case, prob)
            ref = toutputs(tcall())
            checks = {}
            for k, c in calls.items():
                err, where = bc.rel_err(outs[k](c()), ref)
                checks[k] = f"{err:.1e}" + (f" ({where})" if where else "")
            calls["torch"] = tcall
            timed = bc.time_interleaved(torch, calls, args.repeats, 0.005)
            med = {k: sorted(s)[len(s) // 2] * 1e3 for k, (s, _) in timed.items()}
            for k in calls:
                U, nb = layout.get(k, ("", ""))
                line = (f"{cell:9} {B:>3} {H:>5} {pass_:17} {k:12} {U!s:>3} {nb!s:>6} "
                        f"{med[k]:8.3f} {med['torch'] / med[k]:8.2f}  {checks.get(k, '-')}")
                lines.append(line)
                print(line, flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    path = os.path.join(args.out, f"persistent-units-{slug}.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

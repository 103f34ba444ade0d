"""Smoke tests of the command line and the benchmark (``python -m fusedrnn bench``).

They check the plumbing — subcommands, CSV columns and rows, the correctness
flag, skipping torch when it is missing — on a tiny grid with one sample per
provider, so they run in seconds. They say nothing about speed.
"""

import csv
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _bench
from fusedrnn.__main__ import main

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

TINY = ["bench", "--quick", "--repeats", "1", "--min-sample-ms", "0", "--shapes", "5,2,8"]


@pytest.fixture(autouse=True)
def _short_settle(monkeypatch):
    """The benchmark's untimed runs before samples (0.25 s after NumPy's BLAS, 20 ms
    otherwise) would dominate these one-sample runs."""
    monkeypatch.setattr(_bench, "NUMPY_BLAS_SETTLE_S", 0.002)
    monkeypatch.setattr(_bench, "SAMPLE_WARMUP_S", 0.0)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_no_command_lists_commands():
    r = subprocess.run([sys.executable, "-m", "fusedrnn"], capture_output=True, text=True,
                       timeout=60)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    assert "bench" in r.stdout


def test_main_without_arguments_returns_0(capsys):
    assert main([]) == 0
    assert "bench" in capsys.readouterr().out


def test_bench_writes_table_and_csv(tmp_path, capsys):
    path = tmp_path / "out" / "b.csv"  # the directory is created
    threads = fusedrnn.get_num_threads()
    rc = main(TINY + ["--cells", "lstm,gru", "--csv", str(path)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert fusedrnn.get_num_threads() == threads  # restored after the run
    for title in ("cell", "pass", "provider", "ms", "GFLOP/s", "speedup vs torch", "sgemm",
                  "peak:     float32 multiply-add"):
        assert title in out
    assert ("max speedup vs torch" in out) == HAVE_TORCH  # the ceilings table

    columns, rows = read_csv(path)
    assert tuple(columns) == _bench.CSV_COLUMNS
    providers = ["fusedrnn", "reference"] + (["torch", "fusedrnn.torch"] if HAVE_TORCH else [])
    expected = {(c, p, q) for c in ("lstm", "gru") for p in _bench.PASSES for q in providers}
    # the checkpointed cache only in training
    expected |= {(c, "forward+backward", "fusedrnn.ckpt") for c in ("lstm", "gru")}
    assert {(r["cell"], r["pass"], r["provider"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert (r["T"], r["B"], r["I"], r["H"], r["dtype"]) == ("5", "2", "8", "8", "float32")
        assert float(r["ms"]) > 0 and float(r["gflops"]) > 0 and float(r["floor_ms"]) > 0
        assert r["check"] == "ok", r  # every provider agrees with fusedrnn
        if HAVE_TORCH:
            assert float(r["speedup_vs_torch"]) > 0
        else:
            assert r["speedup_vs_torch"] == ""
        # memory of fusedrnn's training runs: the peak holds at least the cache
        if r["pass"] == "forward+backward" and r["provider"] in ("fusedrnn", "fusedrnn.ckpt"):
            assert 0 < float(r["cache_mib"]) <= float(r["peak_mib"])
        else:
            assert r["cache_mib"] == r["peak_mib"] == ""


def test_bench_without_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes ``import torch`` fail
    path = tmp_path / "b.csv"
    rc = main(TINY + ["--cells", "rnn_tanh", "--passes", "forward", "--csv", str(path)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert "torch providers are skipped" in out
    _, rows = read_csv(path)
    assert [r["provider"] for r in rows] == ["fusedrnn", "reference"]
    assert rows[0]["speedup_vs_torch"] == ""
    assert float(rows[0]["speedup_vs_reference"]) > 0


def test_bench_options(tmp_path, capsys):
    """float64, variable lengths, the reference limit and a cell torch lacks."""
    path = tmp_path / "b.csv"
    rc = main(["bench", "--repeats", "1", "--min-sample-ms", "0", "--dtype", "float64",
               "--lengths", "--shapes", "6,3,4,5;4,2,3", "--ref-limit", "60",
               "--cells", "lstm,rnn_sigmoid", "--passes", "forward+backward",
               "--csv", str(path)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    _, rows = read_csv(path)
    got = {(r["cell"], r["T"], r["provider"]) for r in rows}
    # with lengths, fusedrnn also at full length (fusedrnn.full), and the ratio of the two
    by = {(r["cell"], r["T"], r["provider"]): r for r in rows}
    for cell, T in (("lstm", "6"), ("lstm", "4"), ("rnn_sigmoid", "6")):
        f, full = by[(cell, T, "fusedrnn")], by[(cell, T, "fusedrnn.full")]
        assert full["check"] == "-" and full["speedup_vs_torch"] == ""
        ratio = float(f["ms"]) / float(full["ms"])
        line = next(s for s in out.splitlines() if s.startswith(f"  {cell} ") and f"T={T} " in s)
        printed = float(line.split()[-3].rstrip("x"))  # "... <ratio>x  (work <w>x)"
        assert abs(printed - ratio) < 0.006, (line, ratio)
    # 6*3*5 = 90 > 60: no reference there; rnn_sigmoid: no torch
    assert ("lstm", "6", "reference") not in got
    assert ("lstm", "4", "reference") in got
    assert not any(c == "rnn_sigmoid" and p == "torch" for c, _, p in got)
    assert ("lstm", "6", "torch") in got or not HAVE_TORCH
    for r in rows:
        assert r["dtype"] == "float64" and r["lengths"] == "1" and r["check"] in ("ok", "-")
        if (r["T"], r["B"]) == ("6", "3"):
            assert r["H"] == "4" and r["I"] == "5"  # T,B,H,I


def test_bench_flags_wrong_results(tmp_path, monkeypatch, capsys):
    """A provider whose results differ from fusedrnn's is flagged (and fails --strict)."""
    real_forward = fusedrnn.reference.forward

    def wrong_forward(*args, **kwargs):
        y, h_n, c_n, cache = real_forward(*args, **kwargs)
        return y * 1.01, h_n, c_n, cache

    monkeypatch.setattr(fusedrnn.reference, "forward", wrong_forward)
    path = tmp_path / "b.csv"
    args = TINY + ["--cells", "gru", "--passes", "forward", "--providers",
                   "fusedrnn,reference", "--csv", str(path)]
    assert main(args) == 0
    assert main(args + ["--strict"]) == 1
    print(capsys.readouterr().out)
    _, rows = read_csv(path)
    check = {r["provider"]: r["check"] for r in rows}
    assert check["reference"].startswith("MISMATCH")
    assert check["fusedrnn"].startswith("MISMATCH")


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_bench_model(tmp_path, monkeypatch, capsys):
    """--model: the layer inside Embedding -> layer -> Linear, torch.nn's layer against
    fusedrnn.torch's, checked (outputs and every parameter's gradient) before timing; a
    model whose results differ is flagged MISMATCH and fails the run."""
    from fusedrnn import _bench_model

    path = tmp_path / "m.csv"
    args = ["bench", "--model", "--repeats", "1", "--min-sample-ms", "0", "--cells",
            "gru,lstm", "--shapes", "3,2,8", "--csv", str(path)]
    assert main(args) == 0
    print(capsys.readouterr().out)
    _, rows = read_csv(path)
    assert [(r["cell"], r["pass"], r["provider"]) for r in rows] == [
        (c, p, n) for c in ("gru", "lstm") for p in ("forward", "forward+backward")
        for n in ("torch", "fusedrnn.torch")]
    assert all(r["check"] == "ok" and float(r["ms"]) > 0 for r in rows)

    real = _bench_model._models

    def perturbed(torch, cell, H, seed):  # one weight of fusedrnn.torch's layer changed
        ref, fused = real(torch, cell, H, seed)
        with torch.no_grad():
            fused.rnn.weight_hh_l0[0, 0] += 0.5
        return ref, fused

    monkeypatch.setattr(_bench_model, "_models", perturbed)
    assert main(args[:-2] + ["--passes", "forward"]) == 1
    assert "MISMATCH(logits)" in capsys.readouterr().out


def test_bench_jax(tmp_path, monkeypatch, capsys):
    """--jax: fusedrnn.jax against a jax.lax.scan layer and fusedrnn itself, checked
    (outputs, and every gradient) before timing; a peer whose results differ is flagged
    MISMATCH and fails the run; --model with --jax is refused."""
    pytest.importorskip("jax")
    from fusedrnn import _bench_jax

    path = tmp_path / "j.csv"
    args = ["bench", "--jax", "--repeats", "1", "--min-sample-ms", "0", "--cells",
            "gru,lstm,rnn_relu", "--shapes", "3,2,8", "--csv", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    print(out)
    assert "forward+backward: fusedrnn.jax" in out  # the summary
    _, rows = read_csv(path)
    assert [(r["cell"], r["pass"], r["provider"]) for r in rows] == [
        (c, p, n) for c in ("gru", "lstm", "rnn_relu") for p in ("forward", "forward+backward")
        for n in ("jax.lax.scan", "fusedrnn.jax", "fusedrnn")]
    assert all(r["check"] == "ok" and float(r["ms"]) > 0 for r in rows)

    real = _bench_jax.scan_layer

    def off(cell):  # the peer's hidden state nudged at one step
        layer = real(cell)
        return lambda *a: layer(*a).at[1, 0, 0].add(0.01)

    monkeypatch.setattr(_bench_jax, "scan_layer", off)
    assert main(args[:-2] + ["--cells", "lstm", "--passes", "forward"]) == 1
    assert "MISMATCH(y)" in capsys.readouterr().out
    assert main(["bench", "--jax", "--model"]) == 2


def test_time_interleaved_settles_after_numpy_blas(monkeypatch):
    """The reference (NumPy's BLAS, whose threads spin on after a call) is timed after
    the other providers' rounds, not in them; the first call after the check (which
    ran it) is preceded by NUMPY_BLAS_SETTLE_S of untimed calls; every other sample
    of a call that takes under WARMUP_BELOW_S by SAMPLE_WARMUP_S of them; the sizing
    calls by nothing else. Rounds take every other provider once, in changing orders."""
    monkeypatch.setattr(_bench, "NUMPY_BLAS_SETTLE_S", 0.25)
    monkeypatch.setattr(_bench, "SAMPLE_WARMUP_S", 0.02)
    log = []
    monkeypatch.setattr(_bench, "_run_for", lambda call, seconds: log.append(seconds))

    def make(name):
        return lambda: log.append(name)

    names = ("fusedrnn", "reference", "torch", "fusedrnn.torch")
    repeats = 8

    def check(numpy_blas, warm):
        log.clear()
        out = _bench.time_interleaved({n: make(n) for n in names}, repeats, 0,
                                      numpy_blas=numpy_blas)
        assert all(len(out[n][0]) == repeats and out[n][1] == 1 for n in names)
        timed = [x for x in log if isinstance(x, str)]  # min_sample_s=0: one call each
        peers = [n for n in names if n not in numpy_blas]
        k = len(peers)
        assert timed[:k] == peers  # the sizing calls
        rounds = [timed[k + k * r:2 * k + k * r] for r in range(repeats)]
        assert all(sorted(r) == sorted(peers) for r in rounds)
        assert len({tuple(r) for r in rounds}) > 1  # the order changes
        # the provider right after torch is not always the same one
        after_torch = {timed[i + 1] for i in range(k, k + k * repeats - 1)
                       if timed[i] == "torch"}
        assert len(after_torch) > 1
        # the NumPy-BLAS providers: after the rounds, sizing then their samples
        assert timed[k + k * repeats:] == [n for n in numpy_blas for _ in range(1 + repeats)]
        expected = []
        sizing = set()
        for i, name in enumerate(timed):
            if i == 0 and numpy_blas:
                expected.append(0.25)
            elif name in sizing and warm:  # a sample (not a sizing call) of a short call
                expected.append(0.02)
            sizing.add(name)
            expected.append(name)
        assert log == expected

    check(("reference",), True)
    check((), True)  # no NumPy-BLAS provider: warm-ups only
    monkeypatch.setattr(_bench, "WARMUP_BELOW_S", 0.0)  # every call is longer
    check(("reference",), False)


def test_probes():
    core = fusedrnn._core
    assert core.probe_fma_gflops(1, 0.002) > 0
    assert core.probe_stream_gbps(48 * 1024 + 4, 2, 0.002) > 0  # not a multiple of a vector
    for bad in (0, 257):
        with pytest.raises(ValueError, match="threads"):
            core.probe_fma_gflops(bad)
    with pytest.raises(ValueError, match="nbytes"):
        core.probe_stream_gbps(0, 1)
    with pytest.raises(ValueError, match="seconds"):
        core.probe_fma_gflops(1, 0.0)


def test_ceilings_floor(monkeypatch):
    """floor = max(FLOPs at the peak, reads x steps x W_hh bytes at the read rate), at
    the better of the limits measured before and after the grid."""
    rates = {"peak": [80.0, 100.0], "read": [50.0, 40.0]}
    monkeypatch.setattr(fusedrnn._core, "probe_fma_gflops", lambda threads: rates["peak"].pop(0))
    monkeypatch.setattr(fusedrnn._core, "probe_stream_gbps",
                        lambda nbytes, threads: rates["read"].pop(0))
    c = _bench.Ceilings(2, [4 * 64 * 64 * 4])
    assert (c.peak_gflops, c.read_gbps(4 * 64 * 64 * 4)) == (80.0, 50.0)
    c.remeasure()
    assert (c.peak_gflops, c.read_gbps(4 * 64 * 64 * 4)) == (100.0, 50.0)  # the better
    for T, B, H, lengths in ((100, 1, 64, False), (100, 64, 64, False), (20, 8, 64, True)):
        prob = _bench.make_problem("lstm", T, B, H, H, np.float32, lengths, 0)
        steps = int(prob.lengths.max()) if lengths else T
        for pass_, k in (("forward", 1), ("forward+backward", 3)):
            case = _bench.Case("lstm", T, B, H, H, pass_)
            compute = k * 2 * prob.steps * 2 * H * 4 * H / 100e9
            read = min(k, 2) * steps * 4 * H * H * 4 / 50e9
            got = c.floor_ms(c.work(case, prob))
            assert got == pytest.approx(1e3 * max(compute, read))
    # float64: half the float32 peak, 8-byte weights
    rates["read"] = [50.0]
    prob = _bench.make_problem("gru", 10, 64, 32, 32, np.float64, False, 0)
    case = _bench.Case("gru", 10, 64, 32, 32, "forward")
    assert c.floor_ms(c.work(case, prob)) == pytest.approx(
        1e3 * max(2 * 640 * 64 * 96 / 50e9, 10 * 96 * 32 * 8 / 50e9))


def test_parse_shapes():
    assert _bench.parse_shapes(["100,8,256", "5,2,8,3;7x1x2"]) == [
        (100, 8, 256, 256), (5, 2, 3, 8), (7, 1, 2, 2)]
    with pytest.raises(ValueError, match="T,B,H"):
        _bench.parse_shapes(["1,2"])


def test_import_fusedrnn_does_not_import_torch():
    code = ("import sys, fusedrnn, fusedrnn.__main__, fusedrnn._bench; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr

"""Tests of fusedrnn.optim and ``python -m fusedrnn train`` (fusedrnn.train).

Optimizers are checked against their published update rules, written out here
on a two-parameter quadratic (and against torch.optim where installed);
clipping against its definition; accumulation against one big batch; the
command line on short runs.
"""

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import optim, train
from fusedrnn.models import RNNModel, mse_loss

try:
    import torch
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

# f(p) = 1/2 p^T A p - c^T p on two parameters; the gradient is A p - c
A = np.array([[3.0, 0.8], [0.8, 0.5]])
C = np.array([1.0, -2.0])
P0 = np.array([1.5, -0.7])
STEPS = 25


def grad_f(p):
    return A @ p - C


def run_ours(make, steps=STEPS):
    p = {"w": P0.copy()}
    opt = make(p)
    for _ in range(steps):
        opt.step({"w": grad_f(p["w"])})
    return p["w"]


def sgd_published(lr, mu=0.0, tau=0.0, nesterov=False, wd=0.0, steps=STEPS):
    """torch.optim.SGD's documented algorithm, one scalar at a time."""
    p = [float(v) for v in P0]
    b = [None, None]
    for _ in range(steps):
        g = list(grad_f(np.array(p)))
        for i in range(2):
            gi = g[i] + wd * p[i]
            if mu:
                b[i] = gi if b[i] is None else mu * b[i] + (1 - tau) * gi
                gi = gi + mu * b[i] if nesterov else b[i]
            p[i] -= lr * gi
    return np.array(p)


def adam_published(lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False, steps=STEPS):
    """Kingma & Ba (2015) Algorithm 1; decoupled weight decay as Loshchilov & Hutter
    (2019) / torch.optim.AdamW, L2 as torch.optim.Adam."""
    p = [float(v) for v in P0]
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    for t in range(1, steps + 1):
        g = list(grad_f(np.array(p)))
        for i in range(2):
            gi = g[i]
            if decoupled:
                p[i] *= 1 - lr * wd
            else:
                gi += wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return np.array(p)


CASES = {
    "sgd": (lambda p: optim.SGD(p, 0.1), lambda: sgd_published(0.1),
            lambda ps: torch.optim.SGD(ps, 0.1)),
    "sgd_wd": (lambda p: optim.SGD(p, 0.1, weight_decay=0.2), lambda: sgd_published(0.1, wd=0.2),
               lambda ps: torch.optim.SGD(ps, 0.1, weight_decay=0.2)),
    "momentum": (lambda p: optim.SGD(p, 0.05, 0.9), lambda: sgd_published(0.05, 0.9),
                 lambda ps: torch.optim.SGD(ps, 0.05, 0.9)),
    "momentum_dampening": (lambda p: optim.SGD(p, 0.05, 0.9, dampening=0.3),
                           lambda: sgd_published(0.05, 0.9, tau=0.3),
                           lambda ps: torch.optim.SGD(ps, 0.05, 0.9, dampening=0.3)),
    "nesterov": (lambda p: optim.SGD(p, 0.05, 0.9, nesterov=True),
                 lambda: sgd_published(0.05, 0.9, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, 0.05, 0.9, nesterov=True)),
    "adam": (lambda p: optim.Adam(p, 0.05), lambda: adam_published(0.05),
             lambda ps: torch.optim.Adam(ps, 0.05)),
    "adam_l2": (lambda p: optim.Adam(p, 0.05, (0.8, 0.99), 1e-6, weight_decay=0.1),
                lambda: adam_published(0.05, 0.8, 0.99, 1e-6, wd=0.1),
                lambda ps: torch.optim.Adam(ps, 0.05, (0.8, 0.99), 1e-6, weight_decay=0.1)),
    "adamw": (lambda p: optim.AdamW(p, 0.05, weight_decay=0.1),
              lambda: adam_published(0.05, wd=0.1, decoupled=True),
              lambda ps: torch.optim.AdamW(ps, 0.05, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_follows_published_update(case):
    ours, published, _ = CASES[case]
    got, want = run_ours(ours), published()
    print(f"{case}: ours {got}, published {want}")
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, P0)  # it moved


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_torch_optim(case):
    ours, _, theirs = CASES[case]
    w = torch.tensor(P0, requires_grad=True)
    opt = theirs([w])
    for _ in range(STEPS):
        opt.zero_grad()
        w.grad = torch.from_numpy(grad_f(w.detach().numpy()))
        opt.step()
    assert np.allclose(run_ours(ours), w.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_optimizers_converge_and_work_in_float32():
    opt_p = np.linalg.solve(A, C)
    for make in (lambda p: optim.SGD(p, 0.2, 0.5, nesterov=True), lambda p: optim.Adam(p, 0.05)):
        assert np.allclose(run_ours(make, 600), opt_p, atol=1e-4)
    p = {"w": np.ones(3, np.float32)}
    optim.Adam(p, 0.1).step({"w": np.ones(3)})
    assert p["w"].dtype == np.float32 and np.allclose(p["w"], 0.9)


def test_optimizer_argument_errors():
    p = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        optim.SGD(p, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        optim.Adam(p, -1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in \[0, 1\)"):
        optim.Adam(p, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="params must be a dict"):
        optim.Adam([np.zeros(2)])
    with pytest.raises(TypeError, match=r"params\['w'\] must be a float ndarray"):
        optim.SGD({"w": np.zeros(2, int)}, 0.1)
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        optim.SGD({"w": ro}, 0.1)
    opt = optim.SGD(p, 0.1)
    with pytest.raises(ValueError, match="no entry for parameter 'w'"):
        opt.step({"v": np.zeros(2)})
    with pytest.raises(ValueError, match=r"grads\['w'\] must have the parameter's shape"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optim.make_optimizer("rmsprop", p, 0.1)


# --------------------------------------------------------------------------
# Clipping and accumulation
# --------------------------------------------------------------------------

def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert optim.global_norm(g) == 5.0
    norm = optim.clip_grad_norm(g, 10.0)  # below the threshold: untouched
    assert norm == 5.0 and g["a"][0] == 3.0
    norm = optim.clip_grad_norm(g, 1.0)
    assert norm == 5.0
    assert np.isclose(optim.global_norm(g), 1.0, atol=1e-6)
    assert np.allclose(g["a"], [3.0 / (5.0 + 1e-6), 0.0])
    assert np.isclose(g["b"][0, 0], 4.0 / (5 + 1e-6))
    g = {"a": np.array([3.0, 4.0]), "x": np.array([100.0])}  # keys: clip a subset only
    assert optim.clip_grad_norm(g, 1.0, keys=["a"]) == 5.0
    assert g["x"][0] == 100.0
    bad = {"a": np.array([np.inf, 1.0])}
    assert optim.clip_grad_norm(bad, 1.0) == math.inf and bad["a"][1] == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(g, -1.0)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_clip_grad_norm_matches_torch(rng):
    arrays = [rng.standard_normal(s) for s in [(3, 4), (5,), (2, 2, 2)]]
    ours = {str(i): a.copy() for i, a in enumerate(arrays)}
    ts = [torch.zeros(a.shape, dtype=torch.float64, requires_grad=True) for a in arrays]
    for t, a in zip(ts, arrays):
        t.grad = torch.from_numpy(a.copy())
    tn = torch.nn.utils.clip_grad_norm_(ts, 0.7)
    n = optim.clip_grad_norm(ours, 0.7)
    assert abs(n - tn.item()) < 1e-12
    for i, t in enumerate(ts):
        assert np.allclose(ours[str(i)], t.grad.numpy(), rtol=1e-14)


@pytest.mark.parametrize("output", ["sequence", "last"])
def test_k_micro_batches_equal_one_batch(output, rng):
    model = RNNModel("lstm", 3, 5, 2, 2, output=output, dtype=np.float64, seed=0)
    x = rng.standard_normal((7, 8, 3))
    target = rng.standard_normal((7, 8, 2) if output == "sequence" else (8, 2))
    out, _, _, cache = model.forward(x)
    _, dout = mse_loss(out, target)
    full, _ = model.backward(cache, dout)
    k = 4
    acc = optim.GradientAccumulator()
    for j in range(k):
        rows = slice(2 * j, 2 * j + 2)
        o, _, _, c = model.forward(x[:, rows])
        _, d = mse_loss(o, target[:, rows] if output == "sequence" else target[rows])
        g, _ = model.backward(c, d)
        acc.add(g, 1 / k)
    assert len(acc) == k
    for name in full:
        assert np.allclose(acc.grads[name], full[name], rtol=1e-12, atol=1e-14), name


def test_accumulation_with_variable_lengths_weights_by_valid_steps(rng):
    model = RNNModel("gru", 3, 5, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((6, 6, 3))
    target = rng.standard_normal((6, 6, 2))
    lengths = np.array([6, 1, 3, 0, 5, 2])
    out, _, _, cache = model.forward(x, lengths=lengths)
    _, dout = mse_loss(out, target, lengths=lengths)
    full, _ = model.backward(cache, dout)
    acc = optim.GradientAccumulator()
    for rows in (slice(0, 2), slice(2, 6)):
        o, _, _, c = model.forward(x[:, rows], lengths=lengths[rows])
        _, d = mse_loss(o, target[:, rows], lengths=lengths[rows])
        g, _ = model.backward(c, d)
        acc.add(g, lengths[rows].sum() / lengths.sum())
    for name in full:
        assert np.allclose(acc.grads[name], full[name], rtol=1e-12, atol=1e-14), name
    acc.reset()
    assert len(acc) == 0 and acc.grads == {}
    acc.add({"a": np.ones(2)})
    with pytest.raises(ValueError, match="earlier micro-batches"):
        acc.add({"b": np.ones(2)})


def test_trainer_accum_gives_the_same_update():
    def one_step(accum):
        task = train.TASKS["sine"]
        model = RNNModel("rnn_tanh", 1, 8, 1, dtype=np.float64, seed=0)
        opt = optim.Adam(model.params, 0.01)
        tr = train.Trainer(task, model, opt, seq_len=10, batch=8, accum=accum, seed=0)
        loss = tr.train_step()
        return loss, model.params

    l1, p1 = one_step(1)
    l4, p4 = one_step(4)
    assert abs(l1 - l4) < 1e-12
    for k in p1:
        assert np.allclose(p1[k], p4[k], rtol=1e-10, atol=1e-13), k


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------

def test_tasks_shapes_and_targets():
    rng = np.random.default_rng(0)
    x, y = train.TASKS["sine"].sample(rng, 4, 30, np.float32)
    assert x.shape == y.shape == (30, 4, 1) and x.dtype == np.float32
    assert np.allclose(x[1:], y[:-1])  # target is the next value
    x, y = train.TASKS["adding"].sample(rng, 5, 20, np.float64)
    assert x.shape == (20, 5, 2) and y.shape == (5, 1)
    assert np.all(x[..., 1].sum(0) == 2) and np.all(x[:10, :, 1].sum(0) == 1)
    assert np.allclose((x[..., 0] * x[..., 1]).sum(0), y[:, 0])
    x, y = train.TASKS["copy"].sample(rng, 3, 15, np.float32)
    K = train.COPY_SYMBOLS
    assert x.shape == (15 + 2 * K, 3, 10) and y.shape == (15 + 2 * K, 3)
    assert np.all(x.sum(-1) == 1)  # one-hot
    assert np.array_equal(y[-K:], x[:K].argmax(-1))
    assert np.all(y[:-K] == 0) and np.all(x[K + 14].argmax(-1) == 9)  # delimiter


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def cli(argv, capsys):
    """Run ``train`` with ``argv``; returns (exit status, stdout, stderr)."""
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    rc = train.run(p.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def final_loss(out):
    line = [ln for ln in out.splitlines() if ln.startswith("final loss:")][-1]
    return float(line.split()[2])


def test_default_run_learns_and_reports(capsys):
    rc, out, _ = cli(["--steps", "300"], capsys)
    assert rc == 0
    assert "task sine" in out and "rnn_tanh" in out and "adam" in out
    assert out.count("train loss") == 10  # one line per epoch
    assert "sequences/s" in out and "steps/s" in out
    assert final_loss(out) < 0.05  # from 0.5 (predicting 0)


def test_same_seed_same_losses(capsys):
    def losses(seed):
        _, out, _ = cli(["--steps", "10", "--epochs", "2", "--seed", str(seed), "--layers", "2",
                         "--dropout", "0.2", "--hidden", "8", "--batch", "8"], capsys)
        return [ln.split("|grad|")[0] for ln in out.splitlines() if "loss" in ln]

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


@pytest.mark.parametrize("argv", [
    ["--task", "adding", "--cell", "lstm", "--seq-len", "12", "--optimizer", "adamw",
     "--clip", "1"],
    ["--task", "copy", "--cell", "gru", "--seq-len", "5", "--optimizer", "nesterov"],
    ["--task", "sine", "--cell", "lstm", "--tbptt", "7", "--optimizer", "momentum"],
    ["--task", "adding", "--seq-len", "12", "--tbptt", "5"],
    ["--bidirectional", "--layers", "2", "--dropout", "0.1", "--optimizer", "sgd",
     "--accum", "4", "--dtype", "float64", "--threads", "1", "--progress", "text"],
])
def test_options_run(argv, capsys):
    threads = fusedrnn.get_num_threads()
    rc, out, _ = cli(argv + ["--steps", "6", "--epochs", "2", "--hidden", "8", "--batch", "8"],
                     capsys)
    assert rc == 0 and "final loss" in out, out
    assert fusedrnn.get_num_threads() == threads


def test_save_then_load(tmp_path, capsys):
    path = tmp_path / "m.npz"
    base = ["--cell", "gru", "--hidden", "8", "--epochs", "1"]
    rc, out, _ = cli(base + ["--steps", "30", "--save", str(path)], capsys)
    assert rc == 0 and path.exists() and f"to {path}" in out
    rc, out2, _ = cli(base + ["--steps", "0", "--load", str(path)], capsys)
    assert rc == 0 and final_loss(out2) == final_loss(out)  # same held-out batch and model
    rc, _, err = cli(["--cell", "lstm", "--hidden", "8", "--steps", "0", "--load", str(path)],
                     capsys)
    assert rc == 2 and "cannot load" in err and "'gru'" in err
    rc, _, err = cli(base + ["--steps", "0", "--load", str(tmp_path / "none.npz")], capsys)
    assert rc == 2 and "none.npz" in err


def test_invalid_combinations_exit_2(capsys):
    rc, _, err = cli(["--bidirectional", "--tbptt", "5", "--steps", "1"], capsys)
    assert rc == 2 and "unidirectional" in err
    rc, _, err = cli(["--batch", "10", "--accum", "3", "--steps", "1"], capsys)
    assert rc == 2 and "multiple of --accum" in err
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    for bad in (["--hidden", "0"], ["--dropout", "1"], ["--task", "parity"], ["--lr", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_divergence_is_reported(capsys):
    rc, _, err = cli(["--optimizer", "sgd", "--lr", "1e30", "--steps", "5", "--cell", "rnn_relu"],
                     capsys)
    assert rc == 1 and "loss became" in err


def _registered():
    from fusedrnn.__main__ import build_parser
    return "train" in build_parser().format_help()


@pytest.mark.skipif(not _registered(), reason="train is not yet in fusedrnn.__main__._COMMANDS")
def test_python_m_fusedrnn_train_exits_0():
    r = subprocess.run([sys.executable, "-m", "fusedrnn", "train", "--steps", "20"],
                       capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0 and "final loss" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fusedrnn"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "bench" in r.stdout


def test_training_modules_never_import_torch():
    code = ("import sys, fusedrnn, fusedrnn.models, fusedrnn.optim, fusedrnn.train; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

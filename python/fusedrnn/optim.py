"""Optimizers and training aids on dicts of NumPy arrays.

Parameters are a dict name -> ndarray (``model.params``); an optimizer updates
those arrays *in place*, so the model sees every step.  Gradients are a dict
with (at least) the same names, as returned by ``model.backward(...)[0]``.

- ``SGD``: plain, with momentum (heavy ball), dampening and Nesterov momentum.
- ``Adam``: Kingma & Ba (2015), Algorithm 1, with bias correction; weight_decay
  adds an L2 term to the gradient (as ``torch.optim.Adam``).
- ``AdamW``: Loshchilov & Hutter (2019), decoupled weight decay (as
  ``torch.optim.AdamW``).
- ``clip_grad_norm``: global-norm clipping (as ``torch.nn.utils.clip_grad_norm_``).
- ``GradientAccumulator``: sums (scaled) gradients of micro-batches.

The update rules are written out in each class's docstring; they are those of
``torch.optim`` (same defaults), so results agree with PyTorch step for step.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "OPTIMIZERS", "make_optimizer",
           "global_norm", "clip_grad_norm", "GradientAccumulator"]


def _nonneg(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class Optimizer:
    """Base class: holds the parameters, a step count and per-parameter state.

    Args:
        params: dict name -> float ndarray (updated in place; must be writeable).
        lr: learning rate (may be changed between steps: ``opt.lr = ...``).
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float):
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict name -> ndarray (model.params), got "
                            f"{type(params).__name__}")
        if not params:
            raise ValueError("params is empty: nothing to optimize")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
                got = f"ndarray of {p.dtype}" if isinstance(p, np.ndarray) else type(p).__name__
                raise TypeError(f"params[{name!r}] must be a float ndarray, got {got}")
            if not p.flags.writeable:
                raise ValueError(f"params[{name!r}] is read-only; the optimizer updates it "
                                 f"in place")
        self.params: Dict[str, np.ndarray] = dict(params)
        self.lr = _nonneg("lr", lr)
        self.t = 0  # steps taken
        self.state: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in self.params}

    def _grad(self, grads, name, p):
        try:
            g = grads[name]
        except KeyError:
            raise ValueError(f"grads has no entry for parameter {name!r}") from None
        g = np.asarray(g)
        if g.shape != p.shape:
            raise ValueError(f"grads[{name!r}] must have the parameter's shape {p.shape}, "
                             f"got {g.shape}")
        return g.astype(p.dtype, copy=False)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter once from ``grads`` (extra entries are ignored)."""
        checked = {name: self._grad(grads, name, p) for name, p in self.params.items()}
        self.t += 1
        for name, p in self.params.items():
            self._update(p, checked[name], self.state[name])

    def _update(self, p, g, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, t={self.t}, params={len(self.params)})"


class SGD(Optimizer):
    """Stochastic gradient descent (``torch.optim.SGD``).

    With g the gradient, λ weight_decay, μ momentum, τ dampening::

        g <- g + λ p
        if μ != 0:  b <- g on the first step, else b <- μ b + (1 - τ) g
                    g <- g + μ b   (nesterov)   or   g <- b
        p <- p - lr g
    """

    def __init__(self, params, lr, momentum=0.0, *, dampening=0.0, nesterov=False,
                 weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum = _nonneg("momentum", momentum)
        self.dampening = _nonneg("dampening", dampening)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        self.nesterov = bool(nesterov)

    def _update(self, p, g, state):
        if self.weight_decay:
            g = g + p.dtype.type(self.weight_decay) * p
        if self.momentum:
            mu = p.dtype.type(self.momentum)
            if "momentum" not in state:
                state["momentum"] = np.array(g, dtype=p.dtype)  # b_1 = g_1
            else:
                b = state["momentum"]
                b *= mu
                b += p.dtype.type(1.0 - self.dampening) * g
            b = state["momentum"]
            g = g + mu * b if self.nesterov else b
        p -= p.dtype.type(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1; ``torch.optim.Adam``).

    With g the gradient at step t = 1, 2, ..., λ weight_decay (L2, added to g)::

        g <- g + λ p
        m <- β1 m + (1 - β1) g          v <- β2 v + (1 - β2) g²
        m̂ = m / (1 - β1^t)               v̂ = v / (1 - β2^t)
        p <- p - lr m̂ / (sqrt(v̂) + ε)
    """

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= _nonneg(name, b) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b}")
        self.betas = (float(b1), float(b2))
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)

    def _update(self, p, g, state):
        dt = p.dtype.type
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p *= dt(1.0 - self.lr * self.weight_decay)  # AdamW: decay the weights directly
            else:
                g = g + dt(self.weight_decay) * p
        if "m" not in state:
            state["m"] = np.zeros_like(p)
            state["v"] = np.zeros_like(p)
        m, v = state["m"], state["v"]
        m *= dt(b1)
        m += dt(1.0 - b1) * g
        v *= dt(b2)
        v += dt(1.0 - b2) * (g * g)
        c1 = 1.0 - b1 ** self.t
        c2 = 1.0 - b2 ** self.t
        # p -= lr * (m / c1) / (sqrt(v / c2) + eps), written as torch does it
        denom = np.sqrt(v) / dt(math.sqrt(c2)) + dt(self.eps)
        p -= dt(self.lr / c1) * m / denom


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019; ``torch.optim.AdamW``): Adam with decoupled
    weight decay, applied to the parameter before the Adam step::

        p <- p (1 - lr λ)
        m, v, m̂, v̂ as Adam (without L2 in g)
        p <- p - lr m̂ / (sqrt(v̂) + ε)

    Default λ = 0.01 (as torch).
    """

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


#: names accepted by ``make_optimizer`` (and ``train --optimizer``)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def make_optimizer(name, params, lr, *, momentum=0.9, weight_decay=None):
    """An optimizer by name: sgd, momentum (SGD, μ = momentum), nesterov, adam, adamw."""
    if name == "sgd":
        return SGD(params, lr, weight_decay=weight_decay or 0.0)
    if name == "momentum":
        return SGD(params, lr, momentum, weight_decay=weight_decay or 0.0)
    if name == "nesterov":
        return SGD(params, lr, momentum, nesterov=True, weight_decay=weight_decay or 0.0)
    if name == "adam":
        return Adam(params, lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        return AdamW(params, lr, weight_decay=1e-2 if weight_decay is None else weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


# --------------------------------------------------------------------------
# Clipping and accumulation
# --------------------------------------------------------------------------

def global_norm(grads: Mapping[str, np.ndarray], keys: Optional[Iterable[str]] = None) -> float:
    """sqrt of the sum of squares of every entry of ``grads`` (or of ``keys``)."""
    names = list(grads) if keys is None else list(keys)
    total = 0.0
    for name in names:
        g = grads[name]
        if g is None:
            continue
        g = np.asarray(g)
        total += float(np.dot(g.ravel().astype(np.float64, copy=False),
                              g.ravel().astype(np.float64, copy=False)))
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float,
                   keys: Optional[Iterable[str]] = None) -> float:
    """Scale the gradients in place so that their global norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: with N the global L2 norm over all
    entries (or over ``keys``), every gradient is multiplied by
    min(1, max_norm / (N + 1e-6)).  Returns N, the norm before clipping.  A
    non-finite N (inf or nan) leaves the gradients untouched: check the returned
    norm and skip such a step.
    """
    max_norm = _nonneg("max_norm", max_norm)
    names = list(grads) if keys is None else list(keys)
    norm = global_norm(grads, names)
    if not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for name in names:
            g = grads[name]
            if g is not None:
                g *= g.dtype.type(coef)
    return norm


class GradientAccumulator:
    """Sum of (scaled) gradient dicts over micro-batches.

    For a loss that is a mean over the batch, k equal micro-batches added with
    ``scale=1/k`` give the gradient of the whole batch; for unequal sizes use
    ``scale = micro_batch_size / batch_size`` (or, for token-mean losses,
    valid positions of the micro-batch / of the batch)::

        acc = GradientAccumulator()
        for xb, yb in micro_batches:
            grads, _ = model.backward(cache, dout)  # per micro-batch
            acc.add(grads, 1 / k)
        opt.step(acc.grads); acc.reset()
    """

    def __init__(self):
        self.grads: Dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, grads: Mapping[str, np.ndarray], scale: float = 1.0) -> None:
        if self.grads and set(grads) != set(self.grads):
            raise ValueError(f"grads has keys {sorted(grads)}, earlier micro-batches had "
                             f"{sorted(self.grads)}")
        for name, g in grads.items():
            g = np.asarray(g)
            if name not in self.grads:
                self.grads[name] = g * g.dtype.type(scale)
            else:
                acc = self.grads[name]
                if acc.shape != g.shape:
                    raise ValueError(f"grads[{name!r}] has shape {g.shape}, earlier "
                                     f"micro-batches had {acc.shape}")
                acc += g * acc.dtype.type(scale)
        self.count += 1

    def reset(self) -> None:
        self.grads = {}
        self.count = 0

    def __len__(self):
        return self.count

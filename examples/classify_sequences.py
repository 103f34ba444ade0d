"""Sequence classification with variable lengths: which waveform is this?

Each sequence is a noisy sine, square or sawtooth wave (random frequency,
phase and amplitude) of 10 to 80 steps. Sequences are padded to one array
[T, B, 1] and the true lengths passed along; the padding holds NaN on purpose:
fusedrnn never reads it. A bidirectional GRU reads every row up to its own
length (the backward direction starts at the row's last step); the output
layer sees the final states of both directions (``output="last"``) and the
softmax cross-entropy gives one loss per sequence.

    python examples/classify_sequences.py
"""

import numpy as np

from fusedrnn.models import RNNModel, accuracy, cross_entropy
from fusedrnn.optim import AdamW, clip_grad_norm

CLASSES = ("sine", "square", "sawtooth")
T_MAX, B = 80, 32
rng = np.random.default_rng(0)


def batch(n):
    """x [T_MAX, n, 1] (NaN past each row's end), lengths [n], labels [n]."""
    lengths = rng.integers(10, T_MAX + 1, size=n)
    labels = rng.integers(0, len(CLASSES), size=n)
    t = np.arange(T_MAX)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=n) + rng.uniform(0.15, 0.6, size=n) * t
    cycle = (phase / (2 * np.pi)) % 1.0
    waves = np.stack([np.sin(phase), np.sign(np.sin(phase)), 2 * cycle - 1])  # [3, T, n]
    x = waves[labels, :, np.arange(n)].T * rng.uniform(0.5, 1.5, size=n)
    x = x + 0.1 * rng.standard_normal(x.shape)
    x[t >= lengths] = np.nan  # padding: never read
    return x[..., None].astype(np.float32), lengths, labels


model = RNNModel("gru", input_size=1, hidden_size=24, output_size=len(CLASSES),
                 bidirectional=True, output="last", seed=0)
opt = AdamW(model.params, lr=0.01)
x_val, len_val, lab_val = batch(512)

for step in range(1, 401):
    x, lengths, labels = batch(B)
    logits, _, _, cache = model.forward(x, lengths=lengths)  # logits [B, 3]
    loss, dlogits = cross_entropy(logits, labels)
    grads, _ = model.backward(cache, dlogits)
    clip_grad_norm(grads, 1.0)
    opt.step(grads)
    if step % 100 == 0:
        val_logits = model.predict(x_val, lengths=len_val)
        print(f"step {step}  loss {loss:.4f}  held-out accuracy "
              f"{accuracy(val_logits, lab_val):.3f}")

pred = model.predict(x_val, lengths=len_val).argmax(-1)
for short in (True, False):
    rows = len_val < 30 if short else len_val >= 30
    print(f"accuracy on {'short (<30)' if short else 'long (>=30)'} sequences: "
          f"{np.mean(pred[rows] == lab_val[rows]):.3f}")

"""The classic recurrent network, trained on NumPy arrays with fusedrnn.

    h_t = tanh(W_hh h_{t-1} + W_ih x_t + b_h)      (fusedrnn cell "rnn_tanh")
    y_t = W_hy h_t + b_y                            (the output layer, every step)

Task: read a sine wave (random frequency and phase per sequence) and predict
its next value at every step. Loss: mean squared error. Optimizer: Adam, with
global-norm gradient clipping. Runs in a few seconds:

    python examples/classic_rnn.py
"""

import numpy as np

from fusedrnn.models import RNNModel, mse_loss
from fusedrnn.optim import Adam, clip_grad_norm

T, B, H = 50, 32, 32  # steps per sequence, sequences per batch, hidden size
rng = np.random.default_rng(0)


def batch(n):
    """x [T, n, 1]: sin(w t + phase); target [T, n, 1]: the value one step later."""
    w = rng.uniform(0.1, 0.4, size=(1, n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(1, n, 1))
    wave = np.sin(w * np.arange(T + 1)[:, None, None] + phase).astype(np.float32)
    return wave[:-1], wave[1:]


model = RNNModel("rnn_tanh", input_size=1, hidden_size=H, output_size=1, seed=0)
opt = Adam(model.params, lr=0.01)  # updates model.params in place
x_val, y_val = batch(256)

for step in range(1, 1001):
    x, target = batch(B)
    out, h_n, c_n, cache = model.forward(x)  # out [T, B, 1]
    loss, dout = mse_loss(out, target)  # loss and d loss / d out
    grads, _ = model.backward(cache, dout)  # grads: one array per parameter
    clip_grad_norm(grads, 1.0)
    opt.step(grads)
    if step % 200 == 0:
        val, _ = mse_loss(model.predict(x_val), y_val)
        print(f"step {step:4d}  train loss {loss:.5f}  held-out loss {val:.5f}")

# one sequence, the model's next-step predictions next to the truth
pred = model.predict(x_val[:, :1])
print("last 5 steps, target vs prediction:")
for t in range(T - 5, T):
    print(f"  t={t}: {y_val[t, 0, 0]:+.3f}  {pred[t, 0, 0]:+.3f}")

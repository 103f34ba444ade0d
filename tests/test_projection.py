"""LSTM with projection (w_hr, torch.nn.LSTM's proj_size): h' = W_hr (o * tanh(c'))."""

import numpy as np
import pytest

import fusedrnn
from fusedrnn import reference

from conftest import GRAD_KEYS, SEMANTICS, TOL, assert_close, make_problem
from test_compiled import check_against_reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("semantics", list(SEMANTICS))
@pytest.mark.parametrize("H,P", [(9, 5), (16, 3), (5, 12)])
def test_projection_matches_reference(H, P, semantics, dtype, rng):
    problem = make_problem("lstm", 7, 5, 6, H, dtype, rng, proj=P, **SEMANTICS[semantics])
    cache = check_against_reference(*problem, tol=TOL[dtype])
    assert cache.P == P and cache.H == H


def test_projection_shapes_and_grads(rng):
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 4, 3, 2, 6, np.float64, rng, proj=4)
    y, h_n, c_n, cache = fusedrnn.forward(*args, **kw)
    assert y.shape == (4, 3, 4) and h_n.shape == (3, 4) and c_n.shape == (3, 6)
    g = fusedrnn.backward(cache, dy, dh_n, dc_n)
    assert g["w_hr"].shape == (4, 6) and g["w_hh"].shape == (24, 4) and g["h0"].shape == (3, 4)
    g_plain = fusedrnn.backward(fusedrnn.forward(*make_problem("lstm", 4, 3, 2, 6, np.float64,
                                                               rng)[0])[3], None)
    assert g_plain["w_hr"] is None


def test_projection_finite_differences(rng):
    """The reference's projection gradients against central differences (float64)."""
    args, kw, dy, dh_n, dc_n = make_problem("lstm", 4, 3, 3, 5, np.float64, rng, proj=3,
                                            lengths=True, reverse=True)

    def loss(w_hr):
        y, h_n, c_n, _ = reference.forward(*args, **dict(kw, w_hr=w_hr), training=False)
        return np.sum(y * dy) + np.sum(h_n * dh_n) + np.sum(c_n * dc_n)

    _, _, _, cache = reference.forward(*args, **kw)
    g = reference.backward(cache, dy, dh_n, dc_n)["w_hr"]
    w = kw["w_hr"]
    num = np.zeros_like(w)
    eps = 1e-6
    for i in np.ndindex(w.shape):
        wp, wm = w.copy(), w.copy()
        wp[i] += eps
        wm[i] -= eps
        num[i] = (loss(wp) - loss(wm)) / (2 * eps)
    assert_close("dw_hr", g, num, 1e-6)


def test_projection_errors():
    x = np.zeros((3, 2, 4))
    with pytest.raises(ValueError, match="w_hr"):
        fusedrnn.forward("gru", x, np.zeros((15, 4)), np.zeros((15, 5)), w_hr=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"w_hh.*\(20, 3\)"):
        fusedrnn.forward("lstm", x, np.zeros((20, 4)), np.zeros((20, 5)), w_hr=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"h0.*\(2, 3\)"):
        fusedrnn.forward("lstm", x, np.zeros((20, 4)), np.zeros((20, 3)), h0=np.zeros((2, 5)),
                         w_hr=np.zeros((3, 5)))
    with pytest.raises(TypeError, match="w_hr"):
        fusedrnn.forward("lstm", x, np.zeros((20, 4)), np.zeros((20, 3)),
                         w_hr=np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projection_matches_torch(bidirectional, rng):
    torch = pytest.importorskip("torch")
    T, B, I, H, P = 6, 4, 3, 7, 4
    m = torch.nn.LSTM(I, H, proj_size=P, bidirectional=bidirectional).double()
    x = rng.standard_normal((T, B, I))
    lengths = np.array([6, 2, 5, 1])
    xt = torch.tensor(x, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                     enforce_sorted=False)
    out, (h_n, c_n) = m(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    dy = rng.standard_normal(out.shape)
    (out * torch.tensor(dy)).sum().backward()
    for d, suffix in enumerate(["", "_reverse"][: 1 + bidirectional]):
        w = {k: getattr(m, k + "_l0" + suffix).detach().numpy()
             for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
        y, hn, cn, cache = fusedrnn.forward("lstm", x, w["weight_ih"], w["weight_hh"],
                                            w["bias_ih"], w["bias_hh"], lengths=lengths,
                                            reverse=bool(d), w_hr=w["weight_hr"])
        assert_close("y", y, out[..., d * P:(d + 1) * P].detach().numpy(), TOL[np.float64])
        assert_close("h_n", hn, h_n[d].detach().numpy(), TOL[np.float64])
        assert_close("c_n", cn, c_n[d].detach().numpy(), TOL[np.float64])
        g = fusedrnn.backward(cache, np.ascontiguousarray(dy[..., d * P:(d + 1) * P]))
        for k, name in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
                        ("b_hh", "bias_hh"), ("w_hr", "weight_hr")):
            grad = getattr(m, name + "_l0" + suffix).grad.numpy()
            assert_close("d" + k, g[k], grad, TOL[np.float64])

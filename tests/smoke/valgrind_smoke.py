"""A small run of every cell and option for valgrind memcheck (.ci/valgrind)."""
import numpy as np, fusedrnn
rng = np.random.default_rng(0)
for cell in fusedrnn.CELLS:
    G = fusedrnn.CELLS[cell]
    x = rng.standard_normal((5, 3, 4))
    w_ih, w_hh = rng.standard_normal((G * 6, 4)), rng.standard_normal((G * 6, 6))
    for kw in ({}, {"lengths": [5, 0, 2], "reverse": True}, {"mask": rng.random((5, 3)) < 0.5}):
        y, h, c, cache = fusedrnn.forward(cell, x, w_ih, w_hh, **kw)
        fusedrnn.backward(cache, np.ones_like(y))
        y, h, c, cache = fusedrnn.forward(cell, x, w_ih, w_hh, checkpoint=2, **kw)
        fusedrnn.backward(cache, np.ones_like(y))
for ck in (False, 2):
    y, h, c, cache = fusedrnn.forward("lstm", x, w_ih[:24], w_hh[:24, :3],
                                      w_hr=rng.standard_normal((3, 6)), checkpoint=ck)
    fusedrnn.backward(cache, np.ones_like(y))
print("ok")

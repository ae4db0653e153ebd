"""Fixtures of the kernel tests (the root conftest sets up the interpreter and the devices)."""

import functools

import pytest


@pytest.fixture(params=["tma", "pointers"])
def tile_loads(request, monkeypatch):
    """Run a kernel test through both load paths: tensor descriptors (where the strides allow
    them) and plain pointer tiles, which the launchers take with ``tma=False``. Checks that the
    pointer runs really asked every launch for pointers."""
    import kernels.attention
    from kernels import bwd, common, fwd

    asked = []

    def recorded(rows, cols, *tensors, tma=True):
        asked.append(tma)
        return common.tile_descriptors(rows, cols, *tensors, tma=tma)

    for module in (fwd, bwd):
        monkeypatch.setattr(module, "tile_descriptors", recorded)
    if request.param == "pointers":
        for name in ("sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_bwd_fused"):
            launcher = getattr(kernels.attention, name)
            monkeypatch.setattr(kernels.attention, name, functools.partial(launcher, tma=False))
    yield request.param
    assert asked, "no launch asked for tile descriptors"
    assert set(asked) == {request.param == "tma"}, asked


@pytest.fixture
def allocations(monkeypatch):
    """The shapes of every output buffer a launcher asks for (kernels.buffers.new_output)."""
    import kernels.buffers

    shapes = []
    new_output = kernels.buffers.new_output

    def recorded(shape, like, dtype):
        shapes.append(tuple(shape))
        return new_output(shape, like, dtype)

    monkeypatch.setattr(kernels.buffers, "new_output", recorded)
    return shapes


class Launches(list):
    """Each Gluon launch's (kernel, form), in order: kernel "fwd", "dq" or "bwd" (dk/dv), form
    "union" (the union's steps) or "halves" (owned steps)."""

    def of(self, kernel: str) -> list[str]:
        """The forms of ``kernel``'s launches, in order."""
        return [form for name, form in self if name == kernel]


@pytest.fixture
def gluon_launches(monkeypatch) -> Launches:
    """Records launches of the Gluon kernels, so a test sees which really ran (no silent
    fallback)."""
    from kernels import bwd_dkdv_ws, bwd_dq_halves, bwd_dq_ws, fwd_halves, fwd_ws

    launches = Launches()
    for module, name, kernel, form in (
            (fwd_ws, "sparse_attention_fwd_ws", "fwd", "union"),
            (fwd_halves, "sparse_attention_fwd_halves", "fwd", "halves"),
            (bwd_dq_ws, "sparse_attention_dq_ws", "dq", "union"),
            (bwd_dq_halves, "sparse_attention_dq_halves", "dq", "halves"),
            (bwd_dkdv_ws, "sparse_attention_dkdv_ws", "bwd", "union")):
        def counted(*args, real=getattr(module, name), launch=(kernel, form), **kwargs):
            launches.append(launch)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return launches

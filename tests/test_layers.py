"""The hand-written batch norm and max-pool against PyTorch's, to second order."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from metareg.nets.layers import BatchNorm, _BatchNormTrain, max_pool2x2


@pytest.mark.parametrize("shape", [(4, 3, 6, 6), (5, 2, 7, 5), (3, 2, 1, 1)])
def test_max_pool_matches_torch_including_ties_and_odd_sizes(shape):
    g = torch.Generator().manual_seed(0)
    # Rounded values make ties common, as on Omniglot's flat backgrounds.
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).round().requires_grad_()
    if shape[-1] < 2:
        return
    ours, theirs = max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(ours, theirs)
    dy = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, x, dy)
    (g_theirs,) = torch.autograd.grad(theirs, x, dy)
    assert torch.equal(g_ours, g_theirs)


def test_max_pool_second_order():
    x = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(max_pool2x2, (x,))
    assert gradgradcheck(max_pool2x2, (x,))


def test_batch_norm_matches_torch_to_second_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def ours(x, w, b):
        return _BatchNormTrain.apply(x, w, b, 1e-5)

    def theirs(x, w, b):
        return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)

    assert torch.allclose(ours(x, w, b), theirs(x, w, b), atol=1e-12)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    first = [torch.autograd.grad(f(x, w, b), (x, w, b), dy, create_graph=True) for f in (ours, theirs)]
    for a, c in zip(*first):
        assert torch.allclose(a, c, atol=1e-10)
    # Second order: differentiate a scalar function of the first-order gradients.
    second = [torch.autograd.grad(sum((t * t).sum() for t in grads), (x, w, b), allow_unused=True) for grads in first]
    for a, c in zip(*second):
        assert (a is None and c is None) or torch.allclose(a, c, atol=1e-8)
    assert gradgradcheck(ours, (x, w, b))


@pytest.mark.parametrize("mode", ["native", "explicit"])
def test_batch_norm_modes_agree(mode):
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    fast, other = BatchNorm(4).double(), BatchNorm(4, mode=mode).double()
    assert torch.allclose(fast(x), other(x), atol=1e-12)

"""Backbone layers."""

import torch
import torch.nn.functional as F

from metareg.nets import ConvNet
from metareg.nets.layers import BatchNorm


def test_explicit_batch_norm_equals_native():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    native, explicit = BatchNorm(4).double(), BatchNorm(4, explicit=True).double()
    assert torch.allclose(native(x), explicit(x), atol=1e-12)
    assert torch.allclose(native(x), F.batch_norm(x, None, None, training=True), atol=1e-12)


def test_channels_last_query_layout_changes_nothing():
    torch.manual_seed(0)
    model = ConvNet(5, 3, 21, channels=4, depth=3).double()
    x = torch.rand(7, 3, 21, 21, dtype=torch.float64)
    assert torch.allclose(model(x), model(x, memory_format=torch.channels_last), atol=1e-12)


def test_conv4_feature_sizes():
    assert ConvNet(20, 1, 28, channels=64).feature_dim == 64
    assert ConvNet(5, 3, 84, channels=32).feature_dim == 800
    assert ConvNet(5, 1, 28, channels=8, strided=True)(torch.rand(2, 1, 28, 28)).shape == (2, 5)

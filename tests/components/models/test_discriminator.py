import pytest
import torch
from torch import nn

from segshift.components.models.discriminator import FCDiscriminator


def test_one_logit_per_32x32_cell():
    out = FCDiscriminator(19, ndf=8)(torch.randn(2, 19, 64, 128))
    assert out.shape == (2, 1, 2, 4)


def test_reference_channel_sequence_and_layer_settings():
    model = FCDiscriminator(19)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (19, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert list(model.state_dict())[:2] == ["conv1.weight", "conv1.bias"]  # reference names


def test_leaky_relu_after_every_conv_but_the_classifier():
    model = FCDiscriminator(3, ndf=4)
    relus = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert relus and all(m.negative_slope == 0.2 for m in relus)
    # The output is a raw logit: a negative-bias classifier on zero input gives a negative value.
    nn.init.zeros_(model.classifier.weight)
    nn.init.constant_(model.classifier.bias, -1.0)
    assert torch.all(model(torch.randn(1, 3, 32, 32)) == -1.0)


def test_ndf_scales_the_widths():
    convs = [m for m in FCDiscriminator(2, ndf=16).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 1]
    with pytest.raises(ValueError, match="ndf"):
        FCDiscriminator(2, ndf=0)

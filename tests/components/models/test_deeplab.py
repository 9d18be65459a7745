import pytest
import torch

from segshift.components.models.deeplab import DeepLabV2
from segshift.components.models.resnet import ResNetBackbone


def test_reference_deeplabv2_r101_has_the_published_parameter_count():
    model = DeepLabV2(19, "resnet101", aux_head=False)
    assert sum(p.numel() for p in model.parameters()) == 43_901_068


def test_backbone_keys_match_torchvision_resnet_names():
    keys = set(ResNetBackbone("resnet50").state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "layer3.5.conv3.weight", "layer4.2.bn3.bias"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)
    # torchvision's ResNet-50 without fc: 23,508,032 parameters.
    assert sum(p.numel() for p in ResNetBackbone("resnet50").parameters()) == 23_508_032


def test_small_variant_outputs_stride_eight_logits_for_both_heads():
    model = DeepLabV2(19, "resnet18", width=0.25, rates=(1, 2, 3, 4)).eval()
    out = model(torch.randn(2, 3, 64, 128))
    assert len(out.aux) == 1 and out.aux[0].shape == out.main.shape == (2, 19, 8, 16)
    assert DeepLabV2(19, "resnet18", width=0.25, aux_head=False)(torch.randn(1, 3, 64, 64)).aux == ()


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        DeepLabV2(19, "resnet7")

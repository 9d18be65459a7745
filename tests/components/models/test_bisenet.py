import torch

from segshift.components.models.bisenet import BACKBONE_PREFIX, BiSeNet
from segshift.components.models.resnet import ResNetBackbone

# torchvision's resnet18 state dict (without fc), spelled out for the keys that matter.
TORCHVISION_RESNET18_KEYS = ("conv1.weight", "bn1.running_var", "layer1.1.conv2.weight",
                             "layer2.0.downsample.0.weight", "layer3.0.downsample.1.bias",
                             "layer4.1.bn2.weight")


def test_main_logits_at_stride_8_and_aux_at_16_and_32():
    out = BiSeNet(19, "resnet18", width=0.25).eval()(torch.randn(2, 3, 64, 128))
    assert out.main.shape == (2, 19, 8, 16)
    assert [a.shape for a in out.aux] == [(2, 19, 4, 8), (2, 19, 2, 4)]


def test_without_aux_head_there_are_no_aux_outputs():
    model = BiSeNet(5, "resnet18", width=0.25, aux_head=False).eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.main.shape == (1, 5, 8, 8) and out.aux == ()
    assert not any(name.startswith("aux") for name, _ in model.named_parameters())


def test_sides_not_multiple_of_32_and_batch_of_one_train():
    model = BiSeNet(19, "resnet18", width=0.25).train()  # BN on pooled 1x1 maps would fail here
    out = model(torch.randn(1, 3, 70, 100))
    assert out.main.shape == (1, 19, 9, 13)
    (out.main.mean() + sum(a.mean() for a in out.aux)).backward()


def test_backbone_keys_are_torchvision_resnet18_names_behind_the_prefix():
    model = BiSeNet(19, "resnet18", width=0.25)
    backbone_keys = {k[len(BACKBONE_PREFIX):] for k in model.state_dict() if k.startswith(BACKBONE_PREFIX)}
    assert backbone_keys == set(ResNetBackbone("resnet18", width=0.25).state_dict())
    assert set(TORCHVISION_RESNET18_KEYS) <= backbone_keys
    assert model.backbone is model.context_path.backbone


def test_head_parameters_are_everything_but_the_backbone():
    model = BiSeNet(19, "resnet18", width=0.25)
    heads = {id(p) for p in model.head_parameters()}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert heads.isdisjoint(backbone)
    assert heads | backbone == {id(p) for p in model.parameters()}
    assert any(p is model.spatial_path[0][0].weight for p in model.head_parameters())


def test_full_width_resnet18_size_is_the_usual_bisenet_size():
    model = BiSeNet(19, "resnet18", width=1.0)
    # torchvision resnet18 without fc: 11,176,512; BiSeNet-R18 implementations: ~13 M in total.
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_176_512
    assert 12.5e6 < sum(p.numel() for p in model.parameters()) < 14e6

import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from segshift.components.config import ModelConfig
from segshift.components.models.bisenet import BiSeNet
from segshift.components.models.deeplab import DeepLabV2
from segshift.components.models.factory import (
    FrozenBatchNorm2d, ModelError, build_model, check_checkpoint_compatible, count_parameters,
    load_pretrained_backbone)
from segshift.components.models.resnet import ResNetBackbone
from tests.fixtures.s3 import S3Endpoint, moto_endpoint, s3  # noqa: F401


def model_cfg(**overrides) -> ModelConfig:
    fields = dict(name="deeplabv2", backbone="resnet18", width=0.25, rates=[1, 2], aux_head=True,
                  frozen_bn=False, pretrained=None)
    return ModelConfig(**{**fields, **overrides})


def fake_imagenet_weights(depth: str = "resnet18", width: float = 0.25, seed: int = 0) -> dict:
    """A torchvision-format state dict: backbone tensors with recognisable values, plus `fc.*`."""
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.rand(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in ResNetBackbone(depth, width).state_dict().items()}
    weights["fc.weight"] = torch.randn(1000, 8)
    weights["fc.bias"] = torch.randn(1000)
    return weights


def save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def assert_backbone_holds(model: nn.Module, weights: dict) -> None:
    state = model.backbone.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(state[key], weights[key]), key


# --- building -------------------------------------------------------------------------------------

def test_reference_deeplabv2_r101_parameter_count():
    model = build_model(model_cfg(backbone="resnet101", width=1.0, rates=[6, 12, 18, 24], aux_head=False))
    assert isinstance(model, DeepLabV2)
    assert count_parameters(model) == 43_901_068


def test_name_selects_the_network_and_classes_reach_the_output():
    model = build_model(model_cfg(name="bisenet"), num_classes=7).eval()
    assert isinstance(model, BiSeNet)
    assert model(torch.randn(1, 3, 64, 64)).main.shape == (1, 7, 8, 8)


def test_frozen_bn_stays_frozen_through_train_mode_and_backward():
    model = build_model(model_cfg(frozen_bn=True)).train()
    frozen = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen and all(isinstance(m, FrozenBatchNorm2d) and not m.training for m in frozen)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.requires_grad_(True)  # even a blanket unfreeze must not let BN learn
    out = model(torch.randn(2, 3, 64, 64))
    (out.main.mean() + out.aux[0].mean()).backward()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "bn" in k or "downsample.1" in k)
    assert all(m.weight.grad is None and m.bias.grad is None for m in frozen)
    assert model.backbone.conv1.weight.grad is not None  # the convolutions still learn


def test_frozen_bn_keeps_the_state_dict_layout_and_the_eval_output():
    plain = build_model(model_cfg(aux_head=False)).eval()
    frozen = build_model(model_cfg(aux_head=False, frozen_bn=True))
    assert list(frozen.state_dict()) == list(plain.state_dict())
    frozen.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(frozen.train()(x).main, plain(x).main)
    assert count_parameters(frozen, trainable_only=True) < count_parameters(frozen) == count_parameters(plain)


def test_frozen_bn_in_bisenet_only_touches_the_backbone():
    model = build_model(model_cfg(name="bisenet", frozen_bn=True))
    assert isinstance(model.backbone.bn1, FrozenBatchNorm2d)
    assert type(model.spatial_path[0][1]) is nn.BatchNorm2d


# --- pretrained backbone --------------------------------------------------------------------------

def test_pretrained_weights_from_a_file_land_in_the_backbone(tmp_path: Path):
    weights = fake_imagenet_weights()
    uri = save(weights, tmp_path / "resnet18.pth")
    model = build_model(model_cfg(pretrained=uri))
    assert_backbone_holds(model, weights)


def test_pretrained_weights_from_s3(s3: S3Endpoint):
    weights = fake_imagenet_weights(seed=1)
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key="weights/resnet18.pth", Body=buffer.getvalue())
    model = build_model(model_cfg(name="bisenet", pretrained=f"s3://{bucket}/weights/resnet18.pth",
                                  frozen_bn=True), endpoint_url=s3.url)
    assert_backbone_holds(model, weights)


def test_missing_s3_key_names_the_uri(s3: S3Endpoint):
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/weights/nope.pth"
    with pytest.raises(ModelError, match=re.escape(uri) + ".*does not exist"):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), uri, s3.url)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path: Path):
    # The original torchvision ImageNet files predate num_batches_tracked.
    weights = {k: v for k, v in fake_imagenet_weights().items() if not k.endswith("num_batches_tracked")}
    model = DeepLabV2(19, "resnet18", 0.25)
    load_pretrained_backbone(model, save(weights, tmp_path / "old.pth"))
    assert_backbone_holds(model, weights)


def test_missing_file_names_the_path(tmp_path: Path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ModelError, match=re.escape(str(missing)) + ": file not found"):
        build_model(model_cfg(pretrained=str(missing)))


def test_not_a_torch_file(tmp_path: Path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match=re.escape(str(path)) + ": not a loadable PyTorch weights file"):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), str(path))


@pytest.mark.parametrize("obj, found", [([torch.zeros(1)], "got list"),
                                        ({"epoch": 3, "state_dict": {}}, "entries that are not tensors: 2")])
def test_not_a_state_dict(tmp_path: Path, obj: object, found: str):
    uri = save(obj, tmp_path / "wrapped.pth")
    with pytest.raises(ModelError, match=re.escape(uri) + ": not a state dict.*" + found):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), uri)


def test_other_resnet_depth_is_named(tmp_path: Path):
    uri = save(fake_imagenet_weights("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(ModelError) as caught:
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), uri)
    message = str(caught.value)
    assert uri in message and "looks like a resnet50 checkpoint but the model's backbone is resnet18" in message
    assert re.search(r"0 backbone tensors missing from the checkpoint, \d+ checkpoint tensors unexpected "
                     r"\(layer1\.0\.conv3\.weight", message)


def test_prefixed_keys_get_a_hint(tmp_path: Path):
    weights = {f"module.{k}": v for k, v in fake_imagenet_weights().items()}
    uri = save(weights, tmp_path / "dp.pth")
    with pytest.raises(ModelError, match="carry the prefix 'module.'"):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), uri)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path):
    uri = save(fake_imagenet_weights(width=0.5), tmp_path / "wide.pth")
    with pytest.raises(ModelError, match=re.escape(f"{uri}: conv1.weight has shape [32, 3, 7, 7] in the "
                                                   "checkpoint but [16, 3, 7, 7] in the model")):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), uri)


def test_unsupported_scheme():
    with pytest.raises(ModelError, match="http://host/r18.pth: unsupported location"):
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), "http://host/r18.pth")


# --- our own checkpoints --------------------------------------------------------------------------

def test_compatible_checkpoint_passes():
    model = build_model(model_cfg())
    check_checkpoint_compatible(build_model(model_cfg()).state_dict(), model, "best.pt")


def test_class_count_mismatch_is_named():
    source = build_model(model_cfg(aux_head=False), num_classes=16).state_dict()
    with pytest.raises(ModelError, match=re.escape(
            "checkpoint models/source/best.pt has 16 classes (layer6.conv2d_list.0.weight [16, 128, 3, 3]) "
            "but the model is configured for 19")):
        check_checkpoint_compatible(source, build_model(model_cfg(aux_head=False)), "models/source/best.pt")


def test_other_architecture_is_named():
    source = build_model(model_cfg()).state_dict()
    with pytest.raises(ModelError, match="checkpoint a.pt is a deeplabv2 checkpoint but the model is bisenet"):
        check_checkpoint_compatible(source, build_model(model_cfg(name="bisenet")), "a.pt")


def test_aux_head_and_width_mismatches():
    with pytest.raises(ModelError, match=r"different model configuration.* 0 model tensors missing from it, "
                                         r"\d+ of its tensors unexpected \(layer5\."):
        check_checkpoint_compatible(build_model(model_cfg()).state_dict(),
                                    build_model(model_cfg(aux_head=False)), "b.pt")
    with pytest.raises(ModelError, match=re.escape("checkpoint c.pt: backbone.conv1.weight has shape "
                                                   "[32, 3, 7, 7] but the model expects [16, 3, 7, 7]")):
        check_checkpoint_compatible(build_model(model_cfg(width=0.5)).state_dict(),
                                    build_model(model_cfg()), "c.pt")


# --- reference BatchNorm, dilation and class protocol (ADVENT / IntraDA presets) ---------------

from segshift.components.models.factory import AffineFrozenBatchNorm2d  # noqa: E402


def _backbone_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


def test_default_batchnorm_is_plain_trainable_batchnorm():
    cfg = model_cfg()
    assert (cfg.batchnorm, cfg.batchnorm_mode, cfg.dilation, cfg.classes) == (None, "train", "torchvision",
                                                                               "cityscapes19")
    bns = _backbone_bns(build_model(cfg))
    assert bns and all(type(bn) is nn.BatchNorm2d and bn.weight.requires_grad for bn in bns)
    assert model_cfg(frozen_bn=True).batchnorm_mode == "frozen"
    assert all(isinstance(bn, FrozenBatchNorm2d) for bn in _backbone_bns(build_model(model_cfg(batchnorm="frozen"))))


def test_reference_batchnorm_freezes_the_affine_but_uses_and_updates_batch_statistics_in_train_mode():
    torch.manual_seed(0)
    model = build_model(model_cfg(batchnorm="reference", aux_head=False))
    bns = _backbone_bns(model)
    assert bns and all(isinstance(bn, AffineFrozenBatchNorm2d) for bn in bns)
    assert all(not bn.weight.requires_grad and not bn.bias.requires_grad for bn in bns)
    assert all(bn.momentum == 0.1 and bn.track_running_stats for bn in bns)   # nn.BatchNorm2d's default
    bn = model.backbone.bn1
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.5)
    # Train mode: normalised with the batch's statistics (not the stored ones), running stats updated.
    model.train()
    x = torch.randn(2, bn.num_features, 5, 7) * 3 + 1
    mean_before = bn.running_mean.clone()
    y = bn(x)
    batch_mean, batch_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    expected = (x - batch_mean[None, :, None, None]) / torch.sqrt(batch_var[None, :, None, None] + bn.eps) * 2 + 0.5
    assert torch.allclose(y, expected, atol=1e-4)
    assert torch.allclose(bn.running_mean, 0.9 * mean_before + 0.1 * batch_mean, atol=1e-5)
    # Eval mode: the running statistics, which then stay put.
    model.eval()
    stored_mean, stored_var = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x)
    expected = (x - stored_mean[None, :, None, None]) / torch.sqrt(stored_var[None, :, None, None] + bn.eps) * 2 + 0.5
    assert torch.allclose(y, expected, atol=1e-4) and torch.equal(bn.running_mean, stored_mean)
    # The affine never learns, even if every parameter is switched back on.
    model.train().requires_grad_(True)
    model(torch.randn(2, 3, 64, 64)).main.sum().backward()
    assert all(b.weight.grad is None and b.bias.grad is None for b in bns)
    assert model.backbone.conv1.weight.grad is not None


def test_reference_batchnorm_keeps_the_state_dict_layout():
    plain, ref = build_model(model_cfg()), build_model(model_cfg(batchnorm="reference"))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(plain.state_dict())


def test_frozen_bn_contradicting_batchnorm_is_refused_naming_both_keys():
    for mode in ("reference", "train"):
        with pytest.raises(ValueError, match=rf"model\.frozen_bn: true contradicts model\.batchnorm: {mode}"):
            model_cfg(frozen_bn=True, batchnorm=mode)
    assert model_cfg(frozen_bn=True, batchnorm="frozen").batchnorm_mode == "frozen"


def _conv2_dilations(layer: nn.Sequential) -> list[tuple[int, int]]:
    return [(block.conv2.dilation[0], block.conv2.padding[0]) for block in layer]


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_reference_dilation_puts_the_stage_rate_on_every_layer3_and_layer4_block(backbone: str):
    ref = build_model(model_cfg(backbone=backbone, width=0.125, dilation="reference")).backbone
    assert _conv2_dilations(ref.layer3) == [(2, 2)] * len(ref.layer3)
    assert _conv2_dilations(ref.layer4) == [(4, 4)] * len(ref.layer4)
    assert all(block.conv2.stride == (1, 1) for block in [*ref.layer3, *ref.layer4])
    # The built-in default keeps torchvision's form: the first block at the previous rate.
    tv = build_model(model_cfg(backbone=backbone, width=0.125)).backbone
    assert _conv2_dilations(tv.layer3) == [(1, 1)] + [(2, 2)] * (len(tv.layer3) - 1)
    assert _conv2_dilations(tv.layer4) == [(2, 2)] + [(4, 4)] * (len(tv.layer4) - 1)


def test_reference_dilation_keeps_parameters_and_output_size():
    tv = build_model(model_cfg(backbone="resnet50", width=0.125)).eval()
    ref = build_model(model_cfg(backbone="resnet50", width=0.125, dilation="reference")).eval()
    ref.load_state_dict(tv.state_dict())
    x = torch.randn(1, 3, 64, 96)
    assert tv(x).main.shape == ref(x).main.shape == (1, 19, 8, 12)


def test_reference_dilation_with_bisenet_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"model\.dilation: reference .* model\.name: bisenet"):
        model_cfg(name="bisenet", dilation="reference")


def test_synthia16_builds_a_16_output_head():
    model = build_model(model_cfg(classes="synthia16")).eval()
    assert model.num_classes == 16 and model.class_protocol == "synthia16"
    assert {conv.out_channels for conv in [*model.layer6.conv2d_list, *model.layer5.conv2d_list]} == {16}
    out = model(torch.randn(1, 3, 64, 64))
    assert out.main.shape == out.aux[0].shape == (1, 16, 8, 8)
    assert build_model(model_cfg(name="bisenet", classes="synthia16")).num_classes == 16
    assert build_model(model_cfg()).num_classes == 19
    with pytest.raises(ModelError, match="synthia16 has 16 classes but 19"):
        build_model(model_cfg(classes="synthia16"), num_classes=19)


def test_a_19_class_checkpoint_into_a_synthia16_model_is_one_error_naming_file_and_counts():
    nineteen = build_model(model_cfg()).state_dict()
    model = build_model(model_cfg(classes="synthia16"))
    with pytest.raises(ModelError) as info:
        check_checkpoint_compatible(nineteen, model, "models/source/model.pt")
    message = str(info.value)
    assert "\n" not in message and "models/source/model.pt" in message
    assert "has 19 classes" in message and "configured for 16 (model.classes: synthia16)" in message

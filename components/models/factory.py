"""Build the configured network, load ImageNet backbone weights, check checkpoints before loading.

Every model exposes `.backbone` (a torchvision-compatible `ResNetBackbone`), `.num_classes` and
`head_parameters()`; this module relies on nothing else.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.data.storage import S3_SCHEME, S3Root, StorageError
from segshift.components.engine.checkpoint import load_failure_reason, unsafe_content, unsafe_globals
from segshift.components.models.bisenet import BiSeNet
from segshift.components.models.classes import num_protocol_classes
from segshift.components.models.deeplab import DeepLabV2
from segshift.components.models.resnet import ARCHITECTURES, Bottleneck

if TYPE_CHECKING:  # the config module pulls in pydantic and the data generator
    from segshift.components.config import ModelConfig

IGNORED_PRETRAINED_PREFIXES = ("fc.",)  # the ImageNet classifier has no use here
EXAMPLES_SHOWN = 3


class ModelError(ValueError):
    """A model that cannot be built or weights that do not fit it; the message names file and key."""


class AffineFrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm as ADVENT's DeepLab-v2 runs it: affine frozen, statistics as in plain BatchNorm.

    valeoai/ADVENT advent/model/deeplabv2.py builds every BN as `nn.BatchNorm2d(c, affine=True)`
    and sets `requires_grad = False` on its weight and bias; training calls `model.train()`. So in
    train mode the layer normalises with the batch's statistics and updates its running mean and
    variance (momentum 0.1, PyTorch's default); in eval mode it normalises with those running
    statistics; its scale and shift never change. This layer does the same, and its forward
    detaches the affine parameters so that a later `requires_grad_(True)` cannot make them learn.
    A subclass of BatchNorm2d, so the state dict (and every checkpoint) is plain BatchNorm's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True,
                         device=device, dtype=dtype)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            momentum = (self.momentum if self.momentum is not None
                        else 1.0 / float(self.num_batches_tracked))
        weight = self.weight.detach() if self.weight is not None else None
        bias = self.bias.detach() if self.bias is not None else None
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias,
                            training=self.training, momentum=momentum, eps=self.eps)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "AffineFrozenBatchNorm2d":
        if not bn.track_running_stats:
            raise ModelError(f"cannot make {bn} a {cls.__name__}: it keeps no running statistics")
        ref = bn.running_mean
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device=ref.device, dtype=ref.dtype)
        layer.load_state_dict(bn.state_dict())
        layer.train(bn.training)
        return layer


class FrozenBatchNorm2d(AffineFrozenBatchNorm2d):
    """BatchNorm that always normalises with its stored statistics and never learns its affine:
    the affine-frozen layer kept in eval mode through `model.train()`.

    A subclass rather than torchvision's buffer-only FrozenBatchNorm2d so the state dict, and so
    every checkpoint, is the same whether or not BN is frozen.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(num_features, eps, momentum, affine, device=device, dtype=dtype)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)


def replace_batchnorm(module: nn.Module, layer: type[AffineFrozenBatchNorm2d]) -> int:
    """Replace every BatchNorm2d inside `module` that is not already a `layer` by one, in place;
    returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not isinstance(child, layer):
                setattr(parent, name, layer.from_batchnorm(child))
                replaced += 1
    return replaced


def reference_batchnorm(module: nn.Module) -> int:
    """Every BatchNorm2d inside `module` as ADVENT runs it (AffineFrozenBatchNorm2d), in place."""
    return replace_batchnorm(module, AffineFrozenBatchNorm2d)


def freeze_batchnorm(module: nn.Module) -> int:
    """Every BatchNorm2d inside `module` frozen (FrozenBatchNorm2d), in place; returns how many."""
    return replace_batchnorm(module, FrozenBatchNorm2d)


def build_model(cfg: ModelConfig, num_classes: int | None = None, endpoint_url: str | None = None) -> nn.Module:
    """The configured network; ImageNet weights loaded when `cfg.pretrained` is set.

    The head has as many outputs as `cfg.classes` names (cityscapes19: 19, synthia16: 16) unless
    `num_classes` is given (only with cityscapes19; tests build small heads that way). The model
    carries the protocol as `model.class_protocol`.
    `cfg.batchnorm_mode` acts on the backbone's BatchNorm (the layers that hold pretrained
    statistics): "frozen" (FrozenBatchNorm2d), "reference" (AffineFrozenBatchNorm2d) or "train";
    BiSeNet's randomly initialised spatial path, ARMs, FFM and heads keep normal BatchNorm.
    `cfg.rates` and `cfg.dilation` only apply to DeepLab-v2.
    """
    protocol = getattr(cfg, "classes", "cityscapes19")
    wanted = num_protocol_classes(protocol)
    if num_classes is None:
        num_classes = wanted
    elif protocol != "cityscapes19" and num_classes != wanted:
        raise ModelError(f"model.classes: {protocol} has {wanted} classes but {num_classes} were asked for")
    if cfg.name == "deeplabv2":
        model: nn.Module = DeepLabV2(num_classes, cfg.backbone, cfg.width, tuple(cfg.rates), cfg.aux_head,
                                     dilation=getattr(cfg, "dilation", "torchvision"))
    elif cfg.name == "bisenet":
        model = BiSeNet(num_classes, cfg.backbone, cfg.width, cfg.aux_head)
    else:
        raise ModelError(f"unknown model name {cfg.name!r}; expected 'deeplabv2' or 'bisenet'")
    model.class_protocol = protocol if num_classes == wanted else None
    if cfg.pretrained:
        load_pretrained_backbone(model, cfg.pretrained, endpoint_url)
    mode = getattr(cfg, "batchnorm_mode", "frozen" if cfg.frozen_bn else "train")
    if mode == "frozen":
        freeze_batchnorm(model.backbone)
    elif mode == "reference":
        reference_batchnorm(model.backbone)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- pretrained ImageNet weights -----------------------------------------------------------------

def read_weights_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The bytes of a weights file given as a local path or `s3://bucket/key`."""
    if uri.startswith(S3_SCHEME):
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ModelError(f"{uri}: not a weights file location; expected s3://bucket/path/to/file.pth")
        try:
            return S3Root(bucket, endpoint_url=endpoint_url).read_bytes(key)
        except StorageError as error:
            raise ModelError(f"cannot read weights: {error}") from error
    if "://" in uri:
        raise ModelError(f"{uri}: unsupported location; use a local path or s3://bucket/key")
    path = Path(uri).expanduser()
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "file not found"
        raise ModelError(f"{uri}: {reason}")
    try:
        return path.read_bytes()
    except OSError as error:
        raise ModelError(f"{uri}: cannot read ({error.strerror or error})") from error


def load_state_dict_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Deserialise with `weights_only=True` (no arbitrary code from pickles) and check the type."""
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises pickle, zip and runtime errors for foreign files
        refused = unsafe_globals(io.BytesIO(data))
        if refused:
            raise ModelError(f"{source}: {unsafe_content(refused)}") from None
        reason = load_failure_reason(error)
        raise ModelError(f"{source}: not a loadable PyTorch weights file ({reason})") from None
    return as_state_dict(obj, source)


def as_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{source}: not a state dict (a non-empty mapping of names to tensors); "
                         f"got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"{source}: not a state dict: entries that are not tensors: {len(not_tensors)} "
                         f"(e.g. {_examples(not_tensors)}); if it wraps one (e.g. under 'state_dict' "
                         "or 'model'), save that mapping on its own")
    return dict(obj)


def load_pretrained_backbone(model: nn.Module, uri: str, endpoint_url: str | None = None) -> None:
    """Load torchvision-format ResNet ImageNet weights into `model.backbone` (`fc.*` is ignored)."""
    weights = load_state_dict_bytes(read_weights_bytes(uri, endpoint_url), uri)
    weights = {k: v for k, v in weights.items() if not k.startswith(IGNORED_PRETRAINED_PREFIXES)}
    backbone = model.backbone
    expected = backbone.state_dict()
    check_backbone_keys(weights, expected, uri)
    check_backbone_shapes(weights, expected, uri)
    # strict=False only forgives num_batches_tracked, absent from older torchvision checkpoints.
    backbone.load_state_dict(weights, strict=False)


def check_backbone_keys(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                        uri: str) -> None:
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    if not missing and not unexpected:
        return
    message = (f"{uri}: does not match the model's backbone: {len(missing)} backbone tensors missing "
               f"from the checkpoint{_examples_suffix(missing)}, {len(unexpected)} checkpoint tensors "
               f"unexpected{_examples_suffix(unexpected)}")
    found, wanted = guess_resnet(weights), guess_resnet(expected)
    if found and wanted and found != wanted:
        message += f"; it looks like a {found} checkpoint but the model's backbone is {wanted}"
    elif prefix := _common_prefix_hint(weights, expected):
        message += f"; its keys carry the prefix '{prefix}' (expected torchvision names like 'conv1.weight')"
    elif not found:
        message += "; expected torchvision ResNet keys such as conv1.weight, layer1.0.conv1.weight"
    raise ModelError(message)


def check_backbone_shapes(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                          uri: str) -> None:
    wrong = [k for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if not wrong:
        return
    key = wrong[0]
    message = (f"{uri}: {key} has shape {list(weights[key].shape)} in the checkpoint but "
               f"{list(expected[key].shape)} in the model ({len(wrong)} tensors differ)")
    if "conv1.weight" in weights and weights["conv1.weight"].shape[0] != expected["conv1.weight"].shape[0]:
        message += (f"; the checkpoint's stem has {weights['conv1.weight'].shape[0]} channels and the "
                    f"model's {expected['conv1.weight'].shape[0]}: model.width scales them "
                    "(ImageNet weights need width 1.0)")
    raise ModelError(message)


def guess_resnet(state_dict: Iterable[str]) -> str | None:
    """The torchvision ResNet whose layout the keys have, from the block type and layer3's depth."""
    keys = list(state_dict)
    blocks = {int(parts[1]) for parts in (k.split(".") for k in keys)
              if parts[0] == "layer3" and len(parts) > 1 and parts[1].isdigit()}
    if not blocks:
        return None
    bottleneck = any(k.startswith("layer") and ".conv3." in k for k in keys)
    for name, (block, layers) in ARCHITECTURES.items():
        if layers[2] == max(blocks) + 1 and (block is Bottleneck) == bottleneck:
            return name
    return None


def _common_prefix_hint(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """'module.' or 'backbone.' when every key is an expected key behind the same prefix."""
    stem = [k[: -len("conv1.weight")] for k in weights if k.endswith("conv1.weight") and "layer" not in k]
    if len(stem) != 1 or not stem[0]:
        return None
    prefix = stem[0]
    if not all(k.startswith(prefix) for k in weights):
        return None
    used = {k[len(prefix):] for k in weights if not k[len(prefix):].startswith(IGNORED_PRETRAINED_PREFIXES)}
    return prefix if used <= set(expected) else None


# --- our own checkpoints -------------------------------------------------------------------------

def check_checkpoint_compatible(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                                source_name: str) -> None:
    """Raise ModelError naming `source_name` if the checkpoint cannot load into `model` strictly."""
    expected = model.state_dict()
    _check_class_count(state_dict, expected, model, source_name)
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        found, wanted = _describe_network(state_dict), _describe_network(expected)
        kind = (f"is a {found} checkpoint but the model is {wanted}" if found != wanted
                else "was saved from a different model configuration (model.backbone, width, aux_head)")
        raise ModelError(f"checkpoint {source_name} {kind}: {len(missing)} model tensors missing from it"
                         f"{_examples_suffix(missing)}, {len(unexpected)} of its tensors unexpected"
                         f"{_examples_suffix(unexpected)}")
    wrong = [k for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        key = wrong[0]
        raise ModelError(f"checkpoint {source_name}: {key} has shape {list(state_dict[key].shape)} but the "
                         f"model expects {list(expected[key].shape)} ({len(wrong)} tensors differ; "
                         "was it trained with another model.width or backbone?)")


def _check_class_count(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                       model: nn.Module, source_name: str) -> None:
    """The most common mismatch gets its own message: a classifier whose output count differs."""
    num_classes = getattr(model, "num_classes", None)
    backbone = getattr(model, "backbone", None)
    backbone_keys = ({f"{_backbone_prefix(model)}{k}" for k in backbone.state_dict()}
                     if backbone is not None else set())
    for key, want in expected.items():
        got = state_dict.get(key)
        if (num_classes is None or got is None or key in backbone_keys or want.ndim == 0
                or want.shape[0] != num_classes or got.ndim != want.ndim
                or got.shape[0] == want.shape[0] or got.shape[1:] != want.shape[1:]):
            continue
        protocol = getattr(model, "class_protocol", None)
        configured = f"{num_classes} (model.classes: {protocol})" if protocol else f"{num_classes}"
        raise ModelError(f"checkpoint {source_name} has {got.shape[0]} classes ({key} {list(got.shape)}) "
                         f"but the model is configured for {configured}")


def _backbone_prefix(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is model.backbone:
            return f"{name}." if name else ""
    raise ModelError(f"{type(model).__name__}.backbone is not one of its submodules")


def _describe_network(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("context_path.") for k in keys):
        return "bisenet"
    if any(k.startswith("layer6.") for k in keys):
        return "deeplabv2"
    return "unknown-architecture"


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:EXAMPLES_SHOWN]) + (", ..." if len(keys) > EXAMPLES_SHOWN else "")


def _examples_suffix(keys: list[str]) -> str:
    return f" ({_examples(keys)})" if keys else ""

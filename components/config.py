"""The one typed configuration: `params.yaml` validated by pydantic before any work starts.

Every field is required here on purpose: `params.yaml` is the single place where defaults live,
so a value a stage uses can always be found (and changed with `dvc exp run -S`) there.
"""
from __future__ import annotations

import numbers
import os
import reprlib
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      model_validator)

from segshift.components.data.synthetic import CONDITIONS
from segshift.components.stages import COMPARABLE


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key path, value and rule."""


# --- reading a params file: bounded in size, nesting, alias expansion; no duplicate keys -----------

# params.yaml is ~16 KB and ~900 YAML nodes; presets and compare's run records are smaller. The
# limits leave room for long comments and big `compare.entries`, and bound what a file can cost.
MAX_PARAMS_BYTES = 1 << 20      # 1 MiB
MAX_YAML_NODES = 20_000         # after alias expansion (pure-Python parsing: ~0.1 s per 2,000)
MAX_YAML_DEPTH = 32             # params.yaml nests 7 deep
MAX_ECHO = 200                  # characters of a value quoted in an error message
MAX_ERRORS_SHOWN = 20           # validation problems listed for one file
MAX_ERROR_LINE = 400            # characters of one listed problem

_MERGE_TAG = "tag:yaml.org,2002:merge"


def truncated(text: str, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters, saying so: an error message must never print megabytes."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


# Reprs are built bounded (a list of a million items is not rendered, then cut), then cut.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_ECHO
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """`value` as an error message quotes it: repr'd, bounded."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails is named by its type
        text = f"<{type(value).__name__}>"
    return truncated(text)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= (1 << 20) else f"{n / 1024:.1f} KiB"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a PyYAML error (its own text spans several lines and quotes the input)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem:
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return truncated(where + (f"{context}, " if context else "") + problem, MAX_ERROR_LINE)
    return truncated(" ".join(str(exc).split()), MAX_ERROR_LINE)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, with limits checked while the document is composed (before
    anything is built) and duplicate mapping keys refused (PyYAML silently keeps the last one).

    The pure-Python composer is used on purpose: its nesting can be counted, while libyaml's
    recursion cannot be stopped before it exhausts the C stack.
    """

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self._depth = 0
        self._composed = 0

    def compose_node(self, parent, index):
        # An alias comes here too, so a document cannot hide a million uses of one anchor.
        self._composed += 1
        self._depth += 1
        try:
            if self._composed > MAX_YAML_NODES:
                raise ConfigError(f"{self.source}: more than {MAX_YAML_NODES} YAML nodes "
                                  f"(line {self._line()}); a params file has about 1,000")
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{self.source}: line {self._line()}: nested deeper than "
                                  f"{MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _line(self) -> int:
        return self.peek_event().start_mark.line + 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        # Checked before merge keys (`<<: *base`) are flattened: overriding a merged key is fine.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            earlier = first_line.get(key)     # a scalar key is always hashable
            if earlier is not None:
                where = f"twice on line {line}" if earlier == line else f"at lines {earlier} and {line}"
                raise ConfigError(f"{self.source}: duplicate key {shown(key)} {where} (YAML would "
                                  "silently keep the second); remove one")
            first_line[key] = line


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _refuse_alias_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand beyond MAX_YAML_NODES nodes or MAX_YAML_DEPTH levels,
    or refer to themselves, before it is built.

    Aliases stay allowed (a shared `optimizer: &adam {...}` block is legitimate YAML), but their
    expansion is bounded: PyYAML shares the aliased object, so a 9 KB "billion laughs" file loads
    into a few KB, and then any deep copy, repr, dump or validation walks 10^15 items.
    """
    done: dict[int, tuple[int, int]] = {}        # id(node) -> (expanded nodes, expanded depth)
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes = [done[id(child)] for child in _children(node)]
            total = 1 + sum(size for size, _ in sizes)
            depth = 1 + max((d for _, d in sizes), default=0)
            where = f"{source}: line {node.start_mark.line + 1}"
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{where}: aliases expand to more than {MAX_YAML_NODES} YAML nodes "
                                  "(an alias bomb?); write the values out")
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: aliases nest deeper than {MAX_YAML_DEPTH} levels")
            done[key] = (total, depth)
            continue
        if key in done:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias refers to its own "
                              "anchor (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in done)


def parse_yaml(text: str, source: str, error: type[ConfigError] = ConfigError) -> Any:
    """The YAML document in `text` (None if empty), read with the limits above; `error` (a
    ConfigError) names `source` and the problem in one line."""
    source = truncated(source)      # an override's text names it, and may be the bomb itself
    loader = _BoundedLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_alias_expansion(node, source)
        return loader.construct_document(node)
    except ConfigError as exc:
        raise error(str(exc)) from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    finally:
        loader.dispose()


def read_params_text(path: str | Path, what: str = "params file",
                     error: type[ConfigError] = ConfigError) -> str:
    """The text of a params-like file (params, preset, run record): a regular file of at most
    MAX_PARAMS_BYTES, in UTF-8; otherwise `error` naming the file."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO or device would block or never end
            raise error(f"{path}: not a regular file, so not a {what}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
            size = max(len(data), os.fstat(handle.fileno()).st_size)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except PermissionError:
        raise error(f"{path}: cannot read the {what}: permission denied") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise error(f"{path}: the {what} is {_size(size)}, over the {_size(MAX_PARAMS_BYTES)} limit "
                    f"({MAX_PARAMS_BYTES} bytes) for a params file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                    "save it as UTF-8") from None


def load_yaml_file(path: str | Path, what: str = "params file",
                   error: type[ConfigError] = ConfigError) -> Any:
    """A params-like YAML file read with every bound: size, encoding, nesting, aliases, duplicates."""
    return parse_yaml(read_params_text(path, what, error), str(path), error)


# --- the schema -----------------------------------------------------------------------------------

def _plain_number(value: Any) -> Any:
    # numpy scalars (a sweep's sampled values) are numbers; bool and text are not, and stay refused
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


# Strict types: YAML's `true` is not the count 1, "yes" is not a boolean, "8" is not a number.
# An int where a float is expected stays fine (`lr: 1`).
Int = Annotated[int, BeforeValidator(_plain_number), Strict()]
Float = Annotated[float, BeforeValidator(_plain_number), Strict()]
Bool = Annotated[bool, Strict()]

# Bounds of the values that size allocations or loops: generous for real benchmarks (Cityscapes
# 2048x1024, ADVENT's 250k steps), far below what exhausts memory or overflows torch.
MAX_SEED = 2**32 - 1             # numpy's legacy seeding takes at most 32 bits
MAX_SIDE = 8192                  # pixels: crops, resizes, profiled inputs
MIN_SIDE = 16                    # the networks' output stride is 8
MAX_ITERATIONS = 10_000_000
MAX_BATCH = 1024
MAX_ACCUMULATION = 1024
MAX_IMAGES = 1_000_000           # images per generated split
MAX_LOSS_WEIGHT = 1000.0
MAX_CPUS = 1024.0                # per Ray worker / actor
MAX_GPUS = 64.0
MAX_RATE = 64                    # DeepLab-v2 dilation (the reference: 6, 12, 18, 24)
MAX_RATES = 8
MAX_SEEDS = 100
MAX_ROUNDS = 100                 # LSE self-training rounds, LabOR labelling stages

Seed = Annotated[Int, Field(ge=0, le=MAX_SEED)]
Side = Annotated[Int, Field(ge=MIN_SIDE, le=MAX_SIDE)]
Iterations = Annotated[Int, Field(ge=1, le=MAX_ITERATIONS)]
Steps = Annotated[Int, Field(ge=1, le=MAX_ITERATIONS)]           # "every N steps"
BatchSize = Annotated[Int, Field(ge=1, le=MAX_BATCH)]
LossWeight = Annotated[Float, Field(ge=0, le=MAX_LOSS_WEIGHT)]
Cpus = Annotated[Float, Field(gt=0, le=MAX_CPUS)]
Gpus = Annotated[Float, Field(ge=0, le=MAX_GPUS)]
Rate = Annotated[Int, Field(ge=1, le=MAX_RATE)]


class _Strict(BaseModel):
    # Aliases (`rank.lambda`, a Python keyword) are the names in params.yaml, in and out.
    # No inf or nan anywhere: `lr: .inf` would train NaN weights, a nan bound compares false.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, serialize_by_alias=True,
                              validate_by_name=True, validate_by_alias=True, allow_inf_nan=False)


class BuiltinCounts(_Strict):
    source_train: Int = Field(ge=1, le=MAX_IMAGES)
    source_val: Int = Field(ge=1, le=MAX_IMAGES)
    target_train: Int = Field(ge=1, le=MAX_IMAGES)
    target_val: Int = Field(ge=1, le=MAX_IMAGES)
    target_test: Int = Field(ge=1, le=MAX_IMAGES)


class BuiltinConfig(_Strict):
    """The procedural street-scene generator (the embedded default dataset)."""

    seed: Seed
    height: Int = Field(ge=32, le=2048, multiple_of=8)
    width: Int = Field(ge=32, le=4096, multiple_of=8)
    counts: BuiltinCounts
    # 0 = target classes keep the source colours; 1 = full real-like palette (the calibrated gap).
    appearance_gap: Float = Field(ge=0.0, le=1.0)
    # Relative frequency of each target weather/light condition; unknown names are rejected.
    conditions: dict[str, Float]

    @model_validator(mode="after")
    def _known_conditions(self) -> "BuiltinConfig":
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; allowed: {list(CONDITIONS)}")
        if any(w < 0 for w in self.conditions.values()) or sum(self.conditions.values()) <= 0:
            raise ValueError("condition weights must be >= 0 with a positive sum")
        return self


DatasetKind = Literal["builtin", "gta5", "cityscapes", "synthia"]


class DomainConfig(_Strict):
    """Where one domain (source or target) comes from and how it is prepared."""

    kind: DatasetKind
    root: str | None  # local path or s3://bucket/prefix; null for builtin
    resize: tuple[Side, Side] | None  # [width, height] of prepared images; null keeps native size
    # Share of the train split held out as a validation split when the dataset has none.
    val_fraction: Float = Field(ge=0.0, le=0.5)
    # Target only: also keep the reported split's labels at native resolution (Cityscapes val,
    # 2048x1024) and score test predictions there, logits upsampled bilinearly (ADVENT eval_UDA.py).
    full_resolution_labels: Bool = False

    @model_validator(mode="after")
    def _root_matches_kind(self) -> "DomainConfig":
        if self.kind == "builtin" and self.root is not None:
            raise ValueError("root must be null when kind is 'builtin'")
        if self.kind == "builtin" and self.full_resolution_labels:
            raise ValueError("full_resolution_labels must be false when kind is 'builtin' "
                             "(built-in labels are generated at their only resolution)")
        if self.kind == "builtin" and self.resize is not None:
            raise ValueError("resize must be null when kind is 'builtin' "
                             "(the size comes from prepare.builtin.height/width)")
        if self.kind != "builtin" and not self.root:
            raise ValueError(f"root is required when kind is '{self.kind}'")
        return self


class PrepareConfig(_Strict):
    out_dir: str
    strict: Bool  # true: any bad sample is an error; false: skip it and list it in skipped.csv
    workers: Int = Field(ge=1, le=256)
    max_image_pixels: Int = Field(ge=1024, le=1_000_000_000)  # refuse larger images before decoding
    source: DomainConfig
    target: DomainConfig
    builtin: BuiltinConfig

    @model_validator(mode="after")
    def _domains_make_sense(self) -> "PrepareConfig":
        if self.target.kind in ("gta5", "synthia"):
            raise ValueError(f"target.kind '{self.target.kind}' is a synthetic source dataset; "
                             "use 'cityscapes' or 'builtin' as target")
        if self.source.full_resolution_labels:
            raise ValueError("source.full_resolution_labels must be false: only the target is "
                             "evaluated (set target.full_resolution_labels)")
        return self


class StorageConfig(_Strict):
    s3_endpoint_url: str | None  # S3-compatible store (MinIO, moto); null = AWS / AWS_ENDPOINT_URL
    cache_dir: str               # local mirrors of s3:// locations (prepared data, checkpoints)


class ModelConfig(_Strict):
    """The segmentation network every stage trains."""

    name: Literal["deeplabv2", "bisenet"]
    backbone: Literal["resnet18", "resnet50", "resnet101"]
    width: Float = Field(gt=0, le=1)         # channel multiplier; 1 = the published network
    # DeepLab-v2 classifier dilation rates: one 3x3 branch each, padded by its rate
    rates: list[Rate] = Field(min_length=1, max_length=MAX_RATES)
    aux_head: Bool                           # auxiliary head (DeepLab: on layer3)
    frozen_bn: Bool                          # keep BatchNorm statistics and affine fixed
    # The backbone's BatchNorm. train: plain BN (learns its affine, batch statistics in train mode);
    # frozen: stored statistics and affine, always (= frozen_bn: true); reference: ADVENT's
    # deeplabv2.py, affine frozen (requires_grad False) but batch statistics in train mode, running
    # statistics updated (momentum 0.1) and used in eval mode. null: as frozen_bn says.
    batchnorm: Literal["train", "frozen", "reference"] | None = None
    # Dilated layer3/layer4 (DeepLab-v2). torchvision: the first block of each keeps the previous
    # rate (layer3.0: 1, layer4.0: 2); reference: every block at the stage's rate (2 / 4), as ADVENT.
    dilation: Literal["torchvision", "reference"] = "torchvision"
    # The classes the head predicts: cityscapes19 (19 outputs) | synthia16 (16 outputs: no terrain,
    # truck, train; those pixels are ignored in training and evaluation, as the SYNTHIA reference)
    classes: Literal["cityscapes19", "synthia16"] = "cityscapes19"
    pretrained: str | None                   # torchvision-format ImageNet weights: path or s3://

    @property
    def batchnorm_mode(self) -> str:
        """The BatchNorm mode in effect: `batchnorm`, or from `frozen_bn` when that is null."""
        return self.batchnorm or ("frozen" if self.frozen_bn else "train")

    @property
    def num_classes(self) -> int:
        """The head's output count under `classes`."""
        return {"cityscapes19": 19, "synthia16": 16}[self.classes]

    @model_validator(mode="after")
    def _options_fit_together(self) -> "ModelConfig":
        if self.frozen_bn and self.batchnorm not in (None, "frozen"):
            raise ValueError(f"model.frozen_bn: true contradicts model.batchnorm: {self.batchnorm} "
                             "(frozen_bn true means batchnorm frozen); set frozen_bn false")
        if self.dilation == "reference" and self.name != "deeplabv2":
            raise ValueError(f"model.dilation: reference is DeepLab-v2's dilated backbone; model.name: "
                             f"{self.name} has no dilated stages (use dilation: torchvision)")
        return self


class CalibrateConfig(_Strict):
    """`segshift calibrate`: the `source` recipe, shortened, trained three ways to measure the gap."""

    iterations: Iterations
    batch_size: BatchSize
    seed: Seed
    out: str


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam"]
    lr: Float = Field(gt=0, le=1)
    momentum: Float = Field(ge=0, lt=1)            # sgd
    betas: tuple[Float, Float]                      # adam
    weight_decay: Float = Field(ge=0, le=1)
    head_lr_mult: Float = Field(gt=0, le=1000)      # classifier heads train at this x lr
    poly_power: Float = Field(ge=0, le=100)         # lr = base * (1 - step/total) ** power

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1)")
        return self


class WorkersConfig(_Strict):
    """Ray Train scaling: 0 workers trains in-process (quick runs and tests)."""

    num_workers: Int = Field(ge=0, le=1024)
    use_gpu: Bool
    cpus_per_worker: Cpus
    gpus_per_worker: Gpus


class EngineConfig(_Strict):
    """Settings of the training engine shared by every training stage."""

    device: Literal["auto", "cpu", "cuda"]
    # auto: bf16 where the device computes it natively, fp16 on CUDA tensor cores, else fp32
    amp: Literal["auto", "none", "bf16", "fp16"]
    channels_last: Bool | Literal["auto"]   # auto: channels-last on CUDA under AMP, else NCHW
    seed: Seed
    log_every: Steps
    val_every: Steps
    checkpoint_every: Steps
    eval_batch_size: BatchSize
    # How the kept checkpoint is chosen: target-val mIoU, or (no target labels) mean target entropy.
    selection: Literal["val_miou", "val_entropy"]
    cache_images: Bool     # decode every image once and keep it in memory (small datasets)
    loader_workers: Int = Field(ge=0, le=64)
    workers: WorkersConfig


class AugmentConfig(_Strict):
    """Photometric and scale augmentation of a stage's training images (crop and flip are the
    stage's own `crop`/`flip`); labels are only resized (nearest), cropped and flipped."""

    # resize factor drawn from [low, high]; at most 8x (a 2048x1024 image becomes 16k x 8k)
    scale: tuple[Annotated[Float, Field(le=8)], Annotated[Float, Field(le=8)]]
    brightness: Float = Field(ge=0, le=10)  # factors drawn from [1 - x, 1 + x]
    contrast: Float = Field(ge=0, le=10)
    saturation: Float = Field(ge=0, le=10)
    hue: Float = Field(ge=0, le=0.5)    # shift drawn from [-hue, hue] turns of the colour circle
    jitter_p: Float = Field(ge=0, le=1)  # probability of the colour jitter
    blur_p: Float = Field(ge=0, le=1)   # probability of a Gaussian blur
    # its sigma range, pixels; the kernel grows with sigma (~6 sigma wide)
    blur_sigma: tuple[Annotated[Float, Field(le=100)], Annotated[Float, Field(le=100)]]

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        for name in ("scale", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} = [{low}, {high}] must satisfy 0 < low <= high")
        return self


class SupervisedStageConfig(_Strict):
    """A stage trained with labels only: `source` (source labels) or `oracle` (target labels)."""

    iterations: Iterations
    batch_size: BatchSize              # global batch, split evenly over Ray workers
    accumulation: Int = Field(ge=1, le=MAX_ACCUMULATION)   # optimiser step every N batches
    aux_weight: LossWeight             # loss = main + aux_weight * aux (reference: 0.1)
    crop: tuple[Side, Side] | None     # random crop [height, width]; null = whole image
    flip: Bool                         # random horizontal flip
    augment: AugmentConfig | None      # scale, colour jitter, blur; null = crop and flip only
    optimizer: OptimizerConfig


class DiscriminatorConfig(_Strict):
    """The fully-convolutional domain discriminators of an adversarial stage (one per output level)."""

    ndf: Int = Field(ge=1, le=512)     # width of the first conv (reference 64; x2 per layer)
    optimizer: OptimizerConfig         # reference: adam, lr 1e-4, betas (0.9, 0.99)


# `supervised` trains on the stage's labelled images alone (inter: source), no target term: the
# control that gives source-only the adaptation stage's extra steps.
AdaptationMethod = Literal["advent", "minent", "adaptsegnet", "dacs", "fda", "lse", "labor", "supervised"]
# methods that train in rounds from the source model (pseudo-labels or labels between rounds)
ROUND_METHODS = ("lse", "labor")


class DacsConfig(_Strict):
    """`method: dacs` (Tranheden et al. 2021): ClassMix onto target images pseudo-labelled by an EMA teacher."""

    ema_alpha: Float = Field(ge=0, le=1)                  # teacher momentum (ref. 0.99)
    confidence_threshold: Float = Field(gt=0, lt=1)       # confident teacher pixels (ref. 0.968)
    mixed_weight: LossWeight                              # weight of the mixed-image loss (ref. 1)
    # train: the teacher pseudo-labels in train mode, BN on the target batch's statistics, its
    # buffers never averaged (ref.); eval: eval mode with the student's BN statistics copied.
    # The defaults below are the reference's (vikolss/DACS), so configs written before them load.
    teacher_mode: Literal["train", "eval"] = "train"
    confidence_per_image: Bool = False                    # weight per mixed image, not pooled over the batch (ref. false)
    classmix_ignore: Bool = True                          # the ignore label counts as a class ClassMix may paste (ref. true)
    color_jitter: Bool = True                             # mixed images: colour jitter, p 0.8, strength 0.25 (ref. true)
    blur: Bool = True                                     # mixed images: Gaussian blur, p 0.5, sigma 0.15-1.15 (ref. true)


class FdaConfig(_Strict):
    """`method: fda` (Yang & Soatto 2020): source images in target style by a low-frequency amplitude swap."""

    beta: Float = Field(gt=0, lt=0.5)                     # window: b = floor(min(H, W) * beta) (ref. 0.01)
    entropy_weight: LossWeight                            # Charbonnier entropy on target (ref. 0.005)
    eta: Float = Field(gt=0, le=100)                      # its robust exponent (ref. 2)
    entropy_start: Int = Field(ge=0, le=MAX_ITERATIONS)   # 0-based step the entropy term starts
    #   (ref. README: `i > switch2entropy` with 0, i.e. step 1; options default 50k of 150k)
    # Multi-band transfer (MBT): one model per beta (each from the stage's init), evaluated as the
    # ensemble of their mean softmax; it pseudo-labels target train for a self-training round at
    # `beta`. [] = a single FDA model at `beta`. Each round trains the stage's full iterations.
    ensemble_betas: list[Float] = Field(max_length=8)    # each beta trains a whole model
    self_training: bool = True                            # SSL round on the ensemble's labels (ref. yes);
    #   off: the stage's headline result is the ensemble (the reference's evaluation_multi.py)
    self_training_init: Literal["stage", "band"] = "stage"  # where it starts: the init the band models
    #   start from (ref. SStrain.py --init-weights DeepLab_init.pth) | band: the trained `beta` model

    @model_validator(mode="after")
    def _betas(self) -> "FdaConfig":
        for beta in self.ensemble_betas:
            if not 0 < beta < 0.5:
                raise ValueError(f"ensemble_betas: {beta} is outside (0, 0.5)")
        if self.ensemble_betas and self.self_training_init == "band" and self.beta not in self.ensemble_betas:
            raise ValueError(f"self_training_init: band needs beta = {self.beta} among ensemble_betas "
                             f"{self.ensemble_betas}")
        return self


class LseConfig(_Strict):
    """LSE (Subhani & Ali 2020): self-training rounds on scale-invariant crops of confident images."""

    share_start: Float = Field(gt=0, le=1)   # p, the per-class share of images kept, in round 1 (ref. 0.1)
    share_step: Float = Field(ge=0, le=1)    # + per round (ref. 0.05)
    share_max: Float = Field(gt=0, le=1)     # last round's p (ref. 0.4: 7 rounds)
    scale: Float = Field(ge=1, le=8)         # crops of 1/scale the size, upsampled x scale: 2 only (ref.)
    crops_per_image: Int = Field(ge=1, le=64)  # (ref. 4); each crop is one more image in the batch
    gamma: Float = Field(ge=0, le=100)       # focal exponent (ref. 3)
    beta: LossWeight                         # focal term weight (ref. 0.1)
    target_weight: LossWeight                # target loss x this, next to the source loss (ref. 1)

    @model_validator(mode="after")
    def _schedule(self) -> "LseConfig":
        # LSE *is* its 2x scale-invariant examples; any other zoom (1.0 = plain class-balanced
        # self-training) would run another method under LSE's name
        if self.scale != 2.0:
            raise ValueError(f"methods.lse.scale = {self.scale:g}: LSE trains on 2x-zoomed crops (the reference's "
                             "256x512 of 512x1024) and takes only 2.0; for class-balanced self-training without "
                             "the zoom use the rank + intra stages (rank.class_balanced_share)")
        if self.share_max < self.share_start:
            raise ValueError(f"share_max = {self.share_max} is below share_start = {self.share_start}")
        # a tiny step would mean millions of rounds (lse.schedule_rounds counts them the same way)
        if self.share_step > 0 and (self.share_max - self.share_start) / self.share_step + 1 > MAX_ROUNDS:
            raise ValueError(f"share_step = {self.share_step} makes more than {MAX_ROUNDS} rounds from "
                             f"{self.share_start} to {self.share_max}")
        return self


class LaborConfig(_Strict):
    """LabOR (Shin et al. 2021): an annotator labels only the pixels two classifier heads disagree on.
    Budgets are the paper's and count all stages together."""

    selection: Literal["spl", "ppl"]         # segment-based (whole inconsistent regions) or point-based
    label_budget: Float = Field(gt=0, le=1)  # spl: most target pixels labelled per image, all stages (ref. ~0.022)
    points_per_image: Int = Field(ge=1, le=100_000)  # ppl: labelled points per image, all stages (ref. 40)
    stages: Int = Field(ge=1, le=MAX_ROUNDS)  # human-in-the-loop rounds
    discrepancy_weight: LossWeight           # MCD: heads maximise, backbone minimises the L1 discrepancy
    selector_iterations: Iterations          # pixel-selector training steps per stage
    # model A before the first labelling: AdaptSegNet steps (source CE + output-space adversarial
    # loss, the stage's adv_weight_*) from the stage's init, as the paper's UDA model A;
    # 0 = stage 1 starts from the stage's init unadapted (segshift's earlier behaviour)
    adapt_iterations: Int = Field(ge=0, le=MAX_ITERATIONS)
    annotator: Literal["oracle", "files"]    # oracle: target ground truth; files: a person's label PNGs
    annotations: str                         # files: <annotations>/stage-<k>/requests|labels/<id>.png


class MethodsConfig(_Strict):
    """Settings of the methods a stage's `method:` may name (shared by every stage that uses them)."""

    dacs: DacsConfig
    fda: FdaConfig
    lse: LseConfig
    labor: LaborConfig


class AdaptationStageConfig(_Strict):
    """A stage with labelled and unlabelled images: `inter` (source -> target train) and `intra`
    (easy target split with pseudo-labels -> hard target split)."""

    # advent: discriminators on entropy maps; adaptsegnet: on softmax maps; minent: target entropy;
    # dacs: ClassMix with an EMA teacher; fda: Fourier style transfer + entropy (see `methods:`).
    method: AdaptationMethod
    # Initial weights: a previous stage's model (inter: source; intra: inter), the ImageNet backbone
    # of model.pretrained, or scratch.
    init: Literal["source", "inter", "imagenet", "scratch"]
    iterations: Iterations
    batch_size: BatchSize              # images of EACH domain per step (reference: 1 + 1)
    accumulation: Int = Field(ge=1, le=MAX_ACCUMULATION)
    aux_weight: LossWeight             # segmentation loss = main + aux_weight * aux
    crop: tuple[Side, Side] | None     # random crop [height, width]; null = whole image
    flip: Bool
    augment: AugmentConfig | None
    adv_weight_main: LossWeight        # advent/adaptsegnet: lambda_adv (ref. 0.001)
    adv_weight_aux: LossWeight         # lambda_adv of the auxiliary level (ref. 0.0002)
    entropy_weight_main: LossWeight    # minent: lambda_ent (ref. 0.001)
    entropy_weight_aux: LossWeight     # (ref. 0.0002)
    optimizer: OptimizerConfig                # the segmentation network
    discriminator: DiscriminatorConfig


class RankConfig(_Strict):
    """`segshift rank`: entropy ranking of target train with the inter model, easy/hard split."""

    lambda_: Float = Field(alias="lambda", gt=0, lt=1)   # share of target train ranked easy (ref. 0.67)
    # Scale each score by the rare classes its prediction contains (IntraDA's normalisation).
    entropy_normalisation: Bool
    # Easy-split pseudo-label pixels whose max softmax is below this become ignore (255); null = none.
    confidence_threshold: Float | None = Field(ge=0, lt=1)
    # Class-balanced selection (CBST): per predicted class, keep the most confident share p of the
    # easy split's pixels, the rest -> ignore (255); null = keep all.
    class_balanced_share: Float | None = Field(gt=0, le=1)
    batch_size: BatchSize               # images per inference batch
    # Ray Data inference actors; auto: as many as the Ray instance has CPUs (GPUs) for, at most
    # one per batch of target-train images
    concurrency: Annotated[Int, Field(ge=1, le=1024)] | Literal["auto"]
    cpus_per_actor: Cpus
    gpus_per_actor: Gpus
    out_dir: str                        # ranking.parquet and pseudo_labels/ (a DVC out)


EvaluatedStage = Literal["source", "inter", "intra", "oracle"]


class EvaluateConfig(_Strict):
    """`segshift evaluate`: every trained stage's model on target test, side by side."""

    stages: list[EvaluatedStage] = Field(min_length=1, max_length=8)
    out: str                            # the summary JSON (a DVC metric)


class SeedsConfig(_Strict):
    """`segshift seeds`: the training stages repeated over seeds (mean ± std)."""

    values: list[Seed] = Field(min_length=1, max_length=MAX_SEEDS)
    out_dir: str                        # <out_dir>/seed-<n>/... and seeds.json / seeds.md


CompareStage = Literal[COMPARABLE]     # from components/stages.py: a new stage is accepted without an edit here


class CompareEntry(_Strict):
    """One compared method: the stages it runs (in order) and the settings that make it that method."""

    stages: list[CompareStage] = Field(min_length=1, max_length=8)
    set: dict[str, Any] = Field(default_factory=dict)   # dotted key -> value, on top of compare.set


class CompareConfig(_Strict):
    """`segshift compare`: every listed method on the prepared data, once per seed."""

    seeds: list[Seed] = Field(min_length=1, max_length=MAX_SEEDS)
    out_dir: str                        # <out_dir>/<entry>/seed-<n>/: each run's models, metrics, reports
    report: str                         # compare.md; compare.json and the PNG charts beside it
    records: str                        # <records>/<entry>/seed-<n>.json: each finished run's result (committed)
    set: dict[str, Any]                 # dotted key -> value for every entry (the comparison's budget)
    entries: dict[str, CompareEntry] = Field(min_length=1, max_length=200)
    # entry -> its method's published target mIoU (%) in the setting the comparison miniaturises,
    # the source-only entry's included: the report's "ours vs the literature" table
    # (names the comparison does not run are listed as such, so a subset of entries still runs)
    literature: dict[str, Annotated[Float, Field(ge=0, le=100)]] = Field(max_length=200)


class SearchDimension(_Strict):
    """One searched parameter: `uniform`/`loguniform` floats or `int` in [low, high], or a `choice`."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Float | None = None
    high: Float | None = None
    values: list[Any] | None = Field(default=None, max_length=1000)

    @model_validator(mode="after")
    def _well_formed(self) -> "SearchDimension":
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("a choice needs a non-empty `values` list and no low/high")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs `low` and `high` (and no `values`)")
        if not self.low < self.high:
            raise ValueError(f"low = {self.low} must be below high = {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform range needs low > 0, got {self.low}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int range needs whole bounds, got [{self.low}, {self.high}]")
        return self

    def candidates(self) -> list[Any]:
        """The values whose validity bounds the whole dimension: the ends of a range, every choice."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SchedulerConfig(_Strict):
    """Early stopping of trials: ASHA (asynchronous successive halving) or none (fifo)."""

    name: Literal["asha", "fifo"]
    grace_period: Steps                     # training steps before a trial may be stopped
    reduction_factor: Float = Field(gt=1, le=100)   # keep the top 1/factor at each rung


class SweepConfig(_Strict):
    """`segshift sweep`: Ray Tune + Optuna (TPE) over the ranking and intra-stage parameters.

    Each trial reuses the inter model and the ranking inference (computed once per sweep): it
    re-splits, re-selects pseudo-labels, trains the intra stage and is scored on target val.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # <out_dir>/<name>/
    out_dir: str
    num_samples: Int = Field(ge=1, le=100_000)  # trials
    max_concurrent_trials: Int = Field(ge=1, le=1024)
    seed: Seed                                 # Optuna TPE sampler seed
    iterations: Iterations                     # intra training steps per trial
    val_every: Steps                           # steps between validations (= Tune reports)
    scheduler: SchedulerConfig
    workers_per_trial: Int = Field(ge=1, le=1024)  # Ray Train workers of each trial
    cpus_per_worker: Cpus
    gpus_per_worker: Gpus
    storage_path: str | None                   # Tune experiment storage (path or s3://); null = <out_dir>/<name>/tune
    # dotted params key -> dimension; only rank.* and intra.* (what a trial re-runs)
    space: dict[str, SearchDimension] = Field(min_length=1, max_length=64)


class PathsConfig(_Strict):
    """Where stages write; relative paths are relative to the project directory."""

    models: str        # <models>/<stage>/model.pt: the selected network (a DVC out)
    metrics: str       # <metrics>/<stage>.json and per-class tables (DVC metrics and plots)
    reports: str       # <reports>/<stage>/*.png: pictures (also MLflow artifacts)
    checkpoints: str   # <checkpoints>/<stage>/last.pt: resumable working state (not tracked)


class RayConfig(_Strict):
    address: str | None          # null: $RAY_ADDRESS, else a local Ray instance on loopback
    local_num_cpus: Int | None = Field(ge=1, le=4096)   # CPUs a local instance offers; null = all


class TrackingConfig(_Strict):
    uri: str | None       # null: $MLFLOW_TRACKING_URI, else sqlite:///<absolute>/mlflow.db
    experiment: str = Field(min_length=1)


class ProfileConfig(_Strict):
    """`segshift profile`: complexity and speed of each listed model at one input size."""

    height: Int = Field(ge=32, le=MAX_SIDE)
    width: Int = Field(ge=32, le=MAX_SIDE)
    batch_size: BatchSize
    warmup: Int = Field(ge=0, le=10_000)
    repeats: Int = Field(ge=1, le=100_000)
    models: dict[str, ModelConfig] = Field(min_length=1, max_length=64)


class Params(_Strict):
    prepare: PrepareConfig
    storage: StorageConfig
    model: ModelConfig
    engine: EngineConfig
    source: SupervisedStageConfig
    oracle: SupervisedStageConfig
    inter: AdaptationStageConfig
    rank: RankConfig
    intra: AdaptationStageConfig
    evaluate: EvaluateConfig
    methods: MethodsConfig
    seeds: SeedsConfig
    compare: CompareConfig
    sweep: SweepConfig
    paths: PathsConfig
    ray: RayConfig
    tracking: TrackingConfig
    calibrate: CalibrateConfig
    profile: ProfileConfig

    # components/derive.py builds on this schema, hence the imports inside the methods.
    def with_overrides(self, overrides: Mapping[str, Any], where: str, source: str | None = None) -> "Params":
        """These params with each dotted key of `overrides` set, validated; errors name each
        override `<where>.<key>` (see components/derive.py)."""
        from segshift.components.derive import with_overrides
        return with_overrides(self, overrides, where, source)

    def relocated(self, run_dir: str | Path, seed: int | None = None) -> "Params":
        """These params with every output path inside `run_dir` (the prepared data shared), and
        `engine.seed` = `seed` if given."""
        from segshift.components.derive import relocated
        return relocated(self, run_dir, seed)

    @model_validator(mode="after")
    def _stages_fit_together(self) -> "Params":
        allowed_init = {"inter": ("source", "imagenet", "scratch"), "intra": ("inter", "imagenet", "scratch")}
        for stage, allowed in allowed_init.items():
            cfg: AdaptationStageConfig = getattr(self, stage)
            if cfg.init not in allowed:
                raise ValueError(f"{stage}.init: '{cfg.init}' is not allowed here; expected one of {list(allowed)}")
            if cfg.init == "imagenet" and not self.model.pretrained:
                raise ValueError(f"{stage}.init is 'imagenet' but model.pretrained is null; "
                                 "set it to a torchvision ResNet weights file or s3:// URI")
            if stage == "intra" and cfg.method in ROUND_METHODS:
                raise ValueError(f"intra.method: '{cfg.method}' adapts source -> target in rounds of its "
                                 "own; use it as inter.method (intra takes advent, minent, adaptsegnet, dacs, fda)")
            if stage == "intra" and cfg.method == "fda" and self.methods.fda.ensemble_betas:
                raise ValueError("intra.method is 'fda' but methods.fda.ensemble_betas is set: the multi-band "
                                 "ensemble runs in inter only; set ensemble_betas: [] for an intra FDA stage")
            aux = cfg.entropy_weight_aux if cfg.method == "minent" else cfg.adv_weight_aux
            if cfg.method in ("advent", "adaptsegnet", "minent") and aux > 0 and not self.model.aux_head:
                key = "entropy_weight_aux" if cfg.method == "minent" else "adv_weight_aux"
                raise ValueError(f"{stage}.{key} = {aux} adapts a second output level, but "
                                 "model.aux_head is false (one output); set it to 0 or enable the head")
        return self

    @model_validator(mode="after")
    def _class_protocol_fits_the_source(self) -> "Params":
        # synthia16 drops terrain, truck and train: a source that labels them would lose them.
        kind = self.prepare.source.kind
        if self.model.classes == "synthia16" and kind not in ("synthia", "builtin"):
            raise ValueError(f"model.classes: synthia16 is the SYNTHIA protocol (no terrain, truck, train) "
                             f"but prepare.source.kind is {kind}, which labels all 19 classes; "
                             "use model.classes: cityscapes19")
        return self


def _format_error(err: dict[str, Any]) -> str:
    # Keys and values come from the file: both are quoted bounded (a 1 MiB string stays out).
    path = truncated(".".join(str(p) for p in err["loc"]) or "<root>")
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    value = err.get("input")
    quoted = "{...}" if isinstance(value, dict) else shown(value)
    return truncated(f"{path}: {err['msg']} (got {quoted})", MAX_ERROR_LINE)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at the parent of `loc`, for 'unknown key' messages."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def validation_problems(exc: ValidationError, model: type[BaseModel] | None = Params) -> list[str]:
    """One bounded line per problem of `exc` (at most MAX_ERRORS_SHOWN, then how many more)."""
    errors = exc.errors()
    lines = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        line = _format_error(err)
        if err["type"] == "extra_forbidden" and model is not None:
            allowed = _allowed_keys(model, err["loc"])
            if allowed:
                line += f"; allowed: {', '.join(allowed)}"
        lines.append(line)
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return lines


def validate_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = validation_problems(exc)
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join("  " + line for line in lines)) from None


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate a params file; `overrides` maps dotted keys to values (applied first,
    each key existing: see components/derive.py)."""
    from segshift.components.derive import set_dotted   # derive builds on the schema above
    raw = load_yaml_file(path, "params file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value, name=f"override {truncated(dotted)}")
    return validate_params(raw, source=str(path))

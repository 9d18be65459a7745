"""The one typed configuration: `params.yaml` validated by pydantic before any work starts.

Every field is required here on purpose: `params.yaml` is the single place where defaults live,
so a value a stage uses can always be found (and changed with `dvc exp run -S`) there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segshift.components.data.synthetic import CONDITIONS


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key path, value and rule."""


class _Strict(BaseModel):
    # Aliases (`rank.lambda`, a Python keyword) are the names in params.yaml, in and out.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, serialize_by_alias=True,
                              validate_by_name=True, validate_by_alias=True)


class BuiltinCounts(_Strict):
    source_train: int = Field(ge=1)
    source_val: int = Field(ge=1)
    target_train: int = Field(ge=1)
    target_val: int = Field(ge=1)
    target_test: int = Field(ge=1)


class BuiltinConfig(_Strict):
    """The procedural street-scene generator (the embedded default dataset)."""

    seed: int = Field(ge=0)
    height: int = Field(ge=32, le=2048, multiple_of=8)
    width: int = Field(ge=32, le=4096, multiple_of=8)
    counts: BuiltinCounts
    # 0 = target classes keep the source colours; 1 = full real-like palette (the calibrated gap).
    appearance_gap: float = Field(ge=0.0, le=1.0)
    # Relative frequency of each target weather/light condition; unknown names are rejected.
    conditions: dict[str, float]

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
    resize: tuple[int, int] | None  # [width, height] of prepared images; null keeps native size
    # Share of the train split held out as a validation split when the dataset has none.
    val_fraction: float = Field(ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _root_matches_kind(self) -> "DomainConfig":
        if self.kind == "builtin" and self.root is not None:
            raise ValueError("root must be null when kind is 'builtin'")
        if self.kind == "builtin" and self.resize is not None:
            raise ValueError("resize must be null when kind is 'builtin' "
                             "(the size comes from prepare.builtin.height/width)")
        if self.kind != "builtin" and not self.root:
            raise ValueError(f"root is required when kind is '{self.kind}'")
        if self.resize is not None and min(self.resize) < 16:
            raise ValueError(f"resize {list(self.resize)} too small; both sides must be >= 16")
        return self


class PrepareConfig(_Strict):
    out_dir: str
    strict: bool  # true: any bad sample is an error; false: skip it and list it in skipped.csv
    workers: int = Field(ge=1, le=256)
    max_image_pixels: int = Field(ge=1024, le=1_000_000_000)  # refuse larger images before decoding
    source: DomainConfig
    target: DomainConfig
    builtin: BuiltinConfig

    @model_validator(mode="after")
    def _domains_make_sense(self) -> "PrepareConfig":
        if self.target.kind in ("gta5", "synthia"):
            raise ValueError(f"target.kind '{self.target.kind}' is a synthetic source dataset; "
                             "use 'cityscapes' or 'builtin' as target")
        return self


class StorageConfig(_Strict):
    s3_endpoint_url: str | None  # S3-compatible store (MinIO, moto); null = AWS / AWS_ENDPOINT_URL
    cache_dir: str               # local mirrors of s3:// locations (prepared data, checkpoints)


class ModelConfig(_Strict):
    """The segmentation network every stage trains."""

    name: Literal["deeplabv2", "bisenet"]
    backbone: Literal["resnet18", "resnet50", "resnet101"]
    width: float = Field(gt=0, le=1)         # channel multiplier; 1 = the published network
    rates: list[int] = Field(min_length=1)   # DeepLab-v2 classifier dilation rates
    aux_head: bool                           # auxiliary head (DeepLab: on layer3)
    frozen_bn: bool                          # keep BatchNorm statistics and affine fixed
    pretrained: str | None                   # torchvision-format ImageNet weights: path or s3://


class CalibrateConfig(_Strict):
    """`segshift calibrate`: the `source` recipe, shortened, trained three ways to measure the gap."""

    iterations: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = Field(ge=0)
    out: str


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam"]
    lr: float = Field(gt=0, le=1)
    momentum: float = Field(ge=0, lt=1)            # sgd
    betas: tuple[float, float]                      # adam
    weight_decay: float = Field(ge=0, le=1)
    head_lr_mult: float = Field(gt=0)               # classifier heads train at this x lr
    poly_power: float = Field(ge=0)                 # lr = base * (1 - step/total) ** power

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1)")
        return self


class WorkersConfig(_Strict):
    """Ray Train scaling: 0 workers trains in-process (quick runs and tests)."""

    num_workers: int = Field(ge=0, le=1024)
    use_gpu: bool
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)


class EngineConfig(_Strict):
    """Settings of the training engine shared by every training stage."""

    device: Literal["auto", "cpu", "cuda"]
    # auto: bf16 where the device computes it natively, fp16 on CUDA tensor cores, else fp32
    amp: Literal["auto", "none", "bf16", "fp16"]
    channels_last: bool | Literal["auto"]   # auto: channels-last on CUDA under AMP, else NCHW
    seed: int = Field(ge=0)
    log_every: int = Field(ge=1)
    val_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    # How the kept checkpoint is chosen: target-val mIoU, or (no target labels) mean target entropy.
    selection: Literal["val_miou", "val_entropy"]
    cache_images: bool     # decode every image once and keep it in memory (small datasets)
    loader_workers: int = Field(ge=0, le=64)
    workers: WorkersConfig


class AugmentConfig(_Strict):
    """Photometric and scale augmentation of a stage's training images (crop and flip are the
    stage's own `crop`/`flip`); labels are only resized (nearest), cropped and flipped."""

    scale: tuple[float, float]          # resize factor drawn from [low, high]
    brightness: float = Field(ge=0)     # factors drawn from [1 - x, 1 + x]
    contrast: float = Field(ge=0)
    saturation: float = Field(ge=0)
    hue: float = Field(ge=0, le=0.5)    # shift drawn from [-hue, hue] turns of the colour circle
    jitter_p: float = Field(ge=0, le=1)  # probability of the colour jitter
    blur_p: float = Field(ge=0, le=1)   # probability of a Gaussian blur
    blur_sigma: tuple[float, float]     # its sigma range, pixels

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        for name in ("scale", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} = [{low}, {high}] must satisfy 0 < low <= high")
        return self


class SupervisedStageConfig(_Strict):
    """A stage trained with labels only: `source` (source labels) or `oracle` (target labels)."""

    iterations: int = Field(ge=1)
    batch_size: int = Field(ge=1)      # global batch, split evenly over Ray workers
    accumulation: int = Field(ge=1)    # optimiser step every N batches
    aux_weight: float = Field(ge=0)    # loss = main + aux_weight * aux (reference: 0.1)
    crop: tuple[int, int] | None       # random crop [height, width]; null = whole image
    flip: bool                         # random horizontal flip
    augment: AugmentConfig | None      # scale, colour jitter, blur; null = crop and flip only
    optimizer: OptimizerConfig


class DiscriminatorConfig(_Strict):
    """The fully-convolutional domain discriminators of an adversarial stage (one per output level)."""

    ndf: int = Field(ge=1, le=512)     # width of the first conv (reference 64; x2 per layer)
    optimizer: OptimizerConfig         # reference: adam, lr 1e-4, betas (0.9, 0.99)


# `supervised` trains on the stage's labelled images alone (inter: source), no target term: the
# control that gives source-only the adaptation stage's extra steps.
AdaptationMethod = Literal["advent", "minent", "adaptsegnet", "dacs", "fda", "lse", "labor", "supervised"]
# methods that train in rounds from the source model (pseudo-labels or labels between rounds)
ROUND_METHODS = ("lse", "labor")


class DacsConfig(_Strict):
    """`method: dacs` (Tranheden et al. 2021): ClassMix onto target images pseudo-labelled by an EMA teacher."""

    ema_alpha: float = Field(ge=0, le=1)                  # teacher momentum (ref. 0.99)
    confidence_threshold: float = Field(gt=0, lt=1)       # confident teacher pixels (ref. 0.968)
    mixed_weight: float = Field(ge=0)                     # weight of the mixed-image loss (ref. 1)


class FdaConfig(_Strict):
    """`method: fda` (Yang & Soatto 2020): source images in target style by a low-frequency amplitude swap."""

    beta: float = Field(gt=0, lt=0.5)                     # window: b = floor(min(H, W) * beta) (ref. 0.01)
    entropy_weight: float = Field(ge=0)                   # Charbonnier entropy on target (ref. 0.005)
    eta: float = Field(gt=0)                              # its robust exponent (ref. 2)
    entropy_start: int = Field(ge=0)                      # step the entropy term starts (ref. 1/3 of training)
    # Multi-band transfer + self-training: one model per beta (each from the stage's init), their
    # mean prediction pseudo-labels target train, then the `beta` model trains on those too.
    # [] = a single FDA model at `beta`. The stage's iterations are shared by all rounds.
    ensemble_betas: list[float]

    @model_validator(mode="after")
    def _betas(self) -> "FdaConfig":
        for beta in self.ensemble_betas:
            if not 0 < beta < 0.5:
                raise ValueError(f"ensemble_betas: {beta} is outside (0, 0.5)")
        return self


class LseConfig(_Strict):
    """LSE (Subhani & Ali 2020): self-training rounds on scale-invariant crops of confident images."""

    share_start: float = Field(gt=0, le=1)   # p, the per-class share of images kept, in round 1 (ref. 0.1)
    share_step: float = Field(ge=0, le=1)    # + per round (ref. 0.05)
    share_max: float = Field(gt=0, le=1)     # last round's p (ref. 0.4: 7 rounds)
    scale: float = Field(ge=1)               # crops of 1/scale the size, upsampled x scale (ref. 2)
    crops_per_image: int = Field(ge=1)       # (ref. 4)
    gamma: float = Field(ge=0)               # focal exponent (ref. 3)
    beta: float = Field(ge=0)                # focal term weight (ref. 0.1)
    target_weight: float = Field(ge=0)       # target loss x this, next to the source loss (ref. 1)

    @model_validator(mode="after")
    def _schedule(self) -> "LseConfig":
        if self.share_max < self.share_start:
            raise ValueError(f"share_max = {self.share_max} is below share_start = {self.share_start}")
        return self


class LaborConfig(_Strict):
    """LabOR (Shin et al. 2021): an annotator labels only the pixels two classifier heads disagree on."""

    selection: Literal["spl", "ppl"]         # segment-based (whole inconsistent regions) or point-based
    label_budget: float = Field(gt=0, le=1)  # most target pixels labelled over all stages (share, 0-1]
    points_per_image: int = Field(ge=1)      # ppl: labelled points per image and stage (ref. 40)
    stages: int = Field(ge=1)                # human-in-the-loop rounds (ref. 3)
    discrepancy_weight: float = Field(ge=0)  # MCD: heads maximise, backbone minimises the L1 discrepancy
    selector_iterations: int = Field(ge=1)   # pixel-selector training steps per stage
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
    iterations: int = Field(ge=1)
    batch_size: int = Field(ge=1)      # images of EACH domain per step (reference: 1 + 1)
    accumulation: int = Field(ge=1)
    aux_weight: float = Field(ge=0)    # segmentation loss = main + aux_weight * aux
    crop: tuple[int, int] | None
    flip: bool
    augment: AugmentConfig | None
    adv_weight_main: float = Field(ge=0)      # advent/adaptsegnet: lambda_adv (ref. 0.001)
    adv_weight_aux: float = Field(ge=0)       # lambda_adv of the auxiliary level (ref. 0.0002)
    entropy_weight_main: float = Field(ge=0)  # minent: lambda_ent (ref. 0.001)
    entropy_weight_aux: float = Field(ge=0)   # (ref. 0.0002)
    optimizer: OptimizerConfig                # the segmentation network
    discriminator: DiscriminatorConfig


class RankConfig(_Strict):
    """`segshift rank`: entropy ranking of target train with the inter model, easy/hard split."""

    lambda_: float = Field(alias="lambda", gt=0, lt=1)   # share of target train ranked easy (ref. 0.67)
    # Scale each score by the rare classes its prediction contains (IntraDA's normalisation).
    entropy_normalisation: bool
    # Easy-split pseudo-label pixels whose max softmax is below this become ignore (255); null = none.
    confidence_threshold: float | None = Field(ge=0, lt=1)
    # Class-balanced selection (CBST): per predicted class, keep the most confident share p of the
    # easy split's pixels, the rest -> ignore (255); null = keep all.
    class_balanced_share: float | None = Field(gt=0, le=1)
    batch_size: int = Field(ge=1)       # images per inference batch
    # Ray Data inference actors; auto: as many as the Ray instance has CPUs (GPUs) for, at most
    # one per batch of target-train images
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"]
    cpus_per_actor: float = Field(gt=0)
    gpus_per_actor: float = Field(ge=0)
    out_dir: str                        # ranking.parquet and pseudo_labels/ (a DVC out)


EvaluatedStage = Literal["source", "inter", "intra", "oracle"]


class EvaluateConfig(_Strict):
    """`segshift evaluate`: every trained stage's model on target test, side by side."""

    stages: list[EvaluatedStage] = Field(min_length=1)
    out: str                            # the summary JSON (a DVC metric)


class SeedsConfig(_Strict):
    """`segshift seeds`: the training stages repeated over seeds (mean ± std)."""

    values: list[int] = Field(min_length=1)
    out_dir: str                        # <out_dir>/seed-<n>/... and seeds.json / seeds.md


CompareStage = Literal["source", "oracle", "inter", "rank", "intra"]


class CompareEntry(_Strict):
    """One compared method: the stages it runs (in order) and the settings that make it that method."""

    stages: list[CompareStage] = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)   # dotted key -> value, on top of compare.set


class CompareConfig(_Strict):
    """`segshift compare`: every listed method on the prepared data, once per seed."""

    seeds: list[int] = Field(min_length=1)
    out_dir: str                        # <out_dir>/<entry>/seed-<n>/: each run's models, metrics, reports
    report: str                         # compare.md; compare.json and the PNG charts beside it
    set: dict[str, Any]                 # dotted key -> value for every entry (the comparison's budget)
    entries: dict[str, CompareEntry] = Field(min_length=1)


class SearchDimension(_Strict):
    """One searched parameter: `uniform`/`loguniform` floats or `int` in [low, high], or a `choice`."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

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
    grace_period: int = Field(ge=1)         # training steps before a trial may be stopped
    reduction_factor: float = Field(gt=1)   # keep the top 1/factor at each rung


class SweepConfig(_Strict):
    """`segshift sweep`: Ray Tune + Optuna (TPE) over the ranking and intra-stage parameters.

    Each trial reuses the inter model and the ranking inference (computed once per sweep): it
    re-splits, re-selects pseudo-labels, trains the intra stage and is scored on target val.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # <out_dir>/<name>/
    out_dir: str
    num_samples: int = Field(ge=1)             # trials
    max_concurrent_trials: int = Field(ge=1)
    seed: int = Field(ge=0)                    # Optuna TPE sampler seed
    iterations: int = Field(ge=1)              # intra training steps per trial
    val_every: int = Field(ge=1)               # steps between validations (= Tune reports)
    scheduler: SchedulerConfig
    workers_per_trial: int = Field(ge=1)       # Ray Train workers of each trial
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)
    storage_path: str | None                   # Tune experiment storage (path or s3://); null = <out_dir>/<name>/tune
    # dotted params key -> dimension; only rank.* and intra.* (what a trial re-runs)
    space: dict[str, SearchDimension] = Field(min_length=1)


class PathsConfig(_Strict):
    """Where stages write; relative paths are relative to the project directory."""

    models: str        # <models>/<stage>/model.pt: the selected network (a DVC out)
    metrics: str       # <metrics>/<stage>.json and per-class tables (DVC metrics and plots)
    reports: str       # <reports>/<stage>/*.png: pictures (also MLflow artifacts)
    checkpoints: str   # <checkpoints>/<stage>/last.pt: resumable working state (not tracked)


class RayConfig(_Strict):
    address: str | None          # null: $RAY_ADDRESS, else a local Ray instance on loopback
    local_num_cpus: int | None = Field(ge=1)   # CPUs a local instance offers; null = all


class TrackingConfig(_Strict):
    uri: str | None       # null: $MLFLOW_TRACKING_URI, else sqlite:///<absolute>/mlflow.db
    experiment: str = Field(min_length=1)


class ProfileConfig(_Strict):
    """`segshift profile`: complexity and speed of each listed model at one input size."""

    height: int = Field(ge=32)
    width: int = Field(ge=32)
    batch_size: int = Field(ge=1)
    warmup: int = Field(ge=0)
    repeats: int = Field(ge=1)
    models: dict[str, ModelConfig] = Field(min_length=1)


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


def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return f"{path}: {err['msg']} (got {shown})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at the parent of `loc`, for 'unknown key' messages."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def validate_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _format_error(err)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(Params, err["loc"])
                if allowed:
                    line += f"; allowed: {', '.join(allowed)}"
            lines.append("  " + line)
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
        node = node[key]
    node[keys[-1]] = value


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; `overrides` maps dotted keys to values (applied first)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return validate_params(raw, source=str(path))

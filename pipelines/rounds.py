"""Stages that train in rounds, with labelling between the rounds (`inter.method: lse | labor`,
and `fda` with `methods.fda.ensemble_betas`).

A round is an ordinary run of the engine (train.Round: its method, data and starting weights,
its own checkpoints under `<checkpoints>/<stage>/<round>/`). Between rounds the driver predicts
target train with the latest model and writes the next round's labels beside those checkpoints:

- LSE: per round r the share p_r (0.1, 0.15, ... 0.4): per class the int(n_c * p_r / 19) most
  confident images (the reference's rule), their pixels under their class's entropy threshold
  (from the class's first image not kept) as pseudo-labels; each round starts from the previous
  round's selected model.
- FDA: one model per beta of the ensemble, whose mean softmax is evaluated (the paper's MBT
  result) and pseudo-labels target train (per-class confidence thresholds), then a self-training
  round at `beta` on them, from the stage's init like the band models (the reference's).
- LabOR: per labelling stage, a pixel selector (two heads, trained on model A's predictions)
  marks where its heads disagree; SPL/PPL choose pixels within the stage's share of the budget;
  the annotator (the oracle, or a person via files) reveals them; model A trains on source plus
  every target pixel revealed so far.

A round whose labels were written (round.json) is not labelled again, and its training resumes
from its checkpoint, so an interrupted stage picks up where it stopped.

The stage's model is the best, by `engine.selection` on target val, of the segmentation models
its rounds trained (LabOR's pixel selectors are not candidates), the rule the engine applies to
the checkpoints of a single run. Self-training can confirm its own mistakes: on the built-in
data one LSE seed lost 4.5 val points from its first round to its fourth, and reporting the last
round would report that drift rather than the method's best model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segshift.components.data.dataset import PreparedSplit, read_label
from segshift.components.data.image_checks import ImageCheckError, header_size, require_png
from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES, invalid_train_ids
from segshift.components.engine.checkpoint import load_checkpoint
from segshift.components.engine.loop import Selection, resolve_device
from segshift.components.evaluation import Evaluation, validation_metrics
from segshift.components.io import atomic_write_text, write_png
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.metrics import confusion_matrix
from segshift.components.methods import fda as fda_lib
from segshift.components.methods import labor as labor_lib
from segshift.components.methods import lse as lse_lib
from segshift.pipelines.remote import push
from segshift.pipelines.train import (Round, StageInputError, StageJob, initial_model, label_file,
                                      load_stage_model, run_workers, stage_config)

ROUND_FILE = "round.json"


# -- shared machinery -------------------------------------------------------------------------------

def split_iterations(total: int, rounds: int) -> list[int]:
    """`total` steps over `rounds` rounds, as evenly as possible, every round at least one step."""
    base, extra = divmod(max(total, rounds), rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def stage_identity(job: StageJob) -> str:
    """What a round's labels depend on besides the model it starts from: the stage's settings."""
    params = job.config
    identity = {"stage": stage_config(params, job.stage).model_dump(mode="json"),
                "methods": params.methods.model_dump(mode="json"),
                "model": params.model.model_dump(mode="json"), "seed": params.engine.seed}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class RoundRunner:
    """Trains rounds one after another and remembers which were labelled already."""

    def __init__(self, job: StageJob, tracker):
        self.job, self.tracker = job, tracker
        self.params = job.config
        self.cfg = stage_config(self.params, job.stage)
        self.stage_dir = job.stage_checkpoint_dir
        self.device = resolve_device(self.params.engine.device)
        self.identity = stage_identity(job)
        self.offset = 0
        self.candidates: list[tuple[str, StageJob, dict]] = []   # rounds that train the stage's model
        self.earlier_seconds = 0.0      # training time of every round, spent before this run resumed
        job.pull_checkpoints()

    def labelled_before(self, name: str) -> dict | None:
        """The saved round (and what labelling it reported) if its labels were written for these settings."""
        path = self.stage_dir / name / ROUND_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved if saved.get("identity") == self.identity else None

    def save_round(self, spec: Round, report: dict, files: list[Path]) -> None:
        path = self.stage_dir / spec.name / ROUND_FILE
        atomic_write_text(path, json.dumps({"identity": self.identity, "round": dataclasses.asdict(spec),
                                            "report": report}, indent=1))
        push(self.params, self.job.project_dir, self.params.paths.checkpoints, files=[*files, path])

    def train(self, spec: Round) -> tuple[StageJob, dict]:
        job = dataclasses.replace(self.job, round=dataclasses.asdict(spec))
        summary = run_workers(job, self.tracker.log_metrics)
        self.offset = spec.step_offset + spec.iterations
        self.earlier_seconds += summary.get("earlier_seconds", 0.0)
        if spec.method != "labor-selector":
            self.candidates.append((spec.name, job, summary))
        return job, summary

    def round_spec(self, name: str, method: str, iterations: int, data: dict, init: str | None,
                   beta: float | None = None) -> Round:
        return Round(name=name, method=method, iterations=iterations, step_offset=self.offset,
                     data=data, init=init, beta=beta)

    def model(self, init: str | None) -> torch.nn.Module:
        """A round's starting network (None: the stage's init), on the device, in eval mode."""
        model = load_stage_model(self.stage_dir / init, self.params) if init else initial_model(self.job)
        return model.to(self.device).eval()

    @functools.cached_property
    def target_train(self) -> PreparedSplit:
        """Target train images (the manifest is read once per stage, not once per pass)."""
        return PreparedSplit(self.job.prepared / "target", "train", need_labels=False)

    @functools.cached_property
    def image_size(self) -> tuple[int, int]:
        """The one (height, width) of target train: labels are written at image size."""
        sizes = self.target_train.sizes
        if len(sizes) != 1:
            raise StageInputError(f"{self.job.stage}: target train images have {len(sizes)} sizes; "
                                  "resize them when preparing to train in rounds")
        return next(iter(sizes))

    def predict(self, models: list[torch.nn.Module], desc: str) -> Iterator[tuple[list[str], list]]:
        """(sample ids, each model's output) for target train in batches, without gradients."""
        dataset = self.target_train
        loader = DataLoader(dataset, batch_size=self.params.engine.eval_batch_size, shuffle=False)
        start = 0
        with torch.inference_mode():
            for images, _ in tqdm(loader, desc=desc, disable=not self.job.progress, dynamic_ncols=True):
                ids = [row["sample_id"] for row in dataset.rows[start:start + len(images)]]
                start += len(images)
                images = images.to(self.device)
                yield ids, [model(images) for model in models]

    def write_labels(self, name: str, labels: Mapping[str, np.ndarray]) -> list[Path]:
        out = self.stage_dir / name / "labels"
        files = []
        for sample_id, label in labels.items():
            path = label_file(out, sample_id)
            write_png(path, np.asarray(label, np.uint8))
            files.append(path)
        return files

    def need_images(self, name: str, ids: list[str]) -> None:
        if len(ids) < self.cfg.batch_size:
            raise StageInputError(f"{self.job.stage}, round {name}: {len(ids)} target images were "
                                  f"labelled, fewer than {self.job.stage}.batch_size = {self.cfg.batch_size}")

    def log(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.offset)


def source_and_target(labels_dir: str | None = None, ids: list[str] | None = None,
                      target_role: str = "unlabelled") -> dict:
    data = {"labelled": {"domain": "source", "ids": None, "labels_dir": None}}
    data[target_role] = {"domain": "target", "ids": ids, "labels_dir": labels_dir}
    return data


def probabilities(output, size: tuple[int, int]) -> torch.Tensor:
    return upsample(output.main.float(), size).softmax(1)


def run_rounds(job: StageJob, tracker) -> tuple[StageJob, dict]:
    """Train the stage's rounds; returns the job of the round selected on val (its best.pt is the
    stage's model) and its training summary, with what labelling cost under `extra`."""
    method = stage_config(job.config, job.stage).method
    runners: dict[str, Callable] = {"lse": lse_rounds, "fda": fda_rounds, "labor": labor_rounds}
    runner = RoundRunner(job, tracker)
    extra = runners[method](runner)
    job, selected = select_round(runner.candidates, extra)
    return job, {**selected, "earlier_seconds": runner.earlier_seconds}


def select_round(candidates: list[tuple[str, StageJob, dict]], extra: dict) -> tuple[StageJob, dict]:
    """The candidate round whose selected checkpoint scores best on val (the earlier on a tie),
    its summary carrying the stage's `extra` plus `selected_round` and every round's `round_val`."""
    if not candidates:
        raise ValueError("the stage trained no segmentation model in its rounds")
    metric = candidates[0][2]["selection"]["metric"]
    best = Selection(metric=metric)
    chosen = candidates[-1]
    for candidate in candidates:
        value = candidate[2]["selection"]["value"]
        if value is not None and best.improves(value):
            best.value, chosen = value, candidate
    name, job, summary = chosen
    scores = {n: s["selection"]["value"] for n, _, s in candidates}
    return job, {**summary, "extra": {**extra, "selected_round": name, "round_val": {metric: scores}}}


# -- LSE --------------------------------------------------------------------------------------------

def lse_pseudo_labels(runner: RoundRunner, init: str | None, share: float, desc: str) -> tuple[dict, dict]:
    """The round's confident images (per class, the reference's int(n_c * p / 19) most confident)
    and their labels: pixels whose per-class normalised entropy reaches their class's threshold,
    taken from that class's boundary image (the first one not kept), become IGNORE."""
    model, size = runner.model(init), runner.image_size
    ids, scores, predicted, entropy = [], [], [], []
    for batch_ids, (out,) in runner.predict([model], desc):
        probs = probabilities(out, size)
        ids += batch_ids
        scores.append(lse_lib.class_confidence_scores(probs).cpu())
        predicted.append(probs.argmax(1).to(torch.uint8).cpu())
        entropy.append(normalised_entropy(probs).to(torch.float16).cpu())
    selection = lse_lib.class_selection(torch.cat(scores), share)
    chosen = selection.images
    predicted, entropy = torch.cat(predicted), torch.cat(entropy)
    boundary = {c: (entropy[i].float(), predicted[i].long())
                for c, i in enumerate(selection.boundary) if i is not None}
    thresholds = lse_lib.class_entropy_thresholds(boundary, NUM_CLASSES)
    labels = {ids[i]: lse_lib.select_pseudo_labels(predicted[i].long(), entropy[i].float(), thresholds).numpy()
              for i in chosen}
    labelled = float(np.mean([(label != IGNORE_INDEX).mean() for label in labels.values()])) if labels else 0.0
    report = {"share": share, "images": len(chosen), "labelled_pixels": labelled,
              # null: the class keeps every pixel (its boundary image's entropies were all equal)
              "entropy_thresholds": [round(float(t), 6) if np.isfinite(float(t)) else None for t in thresholds]}
    return labels, report


def lse_rounds(runner: RoundRunner) -> dict:
    """Trains the rounds; returns what they labelled, for the stage's metrics."""
    lse = runner.params.methods.lse
    count = lse_lib.schedule_rounds(lse.share_start, lse.share_step, lse.share_max)
    init, reports = None, []
    for r, iterations in enumerate(split_iterations(runner.cfg.iterations, count)):
        name = f"round-{r + 1}"
        saved = runner.labelled_before(name)
        if saved is None:
            share = lse_lib.share_schedule(r, lse.share_start, lse.share_step, lse.share_max)
            labels, report = lse_pseudo_labels(runner, init, share, f"lse {name}: pseudo-labels")
            runner.need_images(name, list(labels))
            spec = runner.round_spec(name, "lse", iterations,
                                     source_and_target(f"{name}/labels", sorted(labels), "pseudo"), init)
            runner.save_round(spec, report, runner.write_labels(name, labels))
        else:
            spec, report = Round(**saved["round"]), saved["report"]
        runner.log({"lse_share": report["share"], "lse_images": report["images"],
                    "lse_labelled_pixels": report["labelled_pixels"]})
        reports.append({"round": name, **report})
        runner.train(spec)
        init = f"{name}/best.pt"
    return {"rounds": reports}


# -- FDA: multi-band ensemble + self-training --------------------------------------------------------

def ensemble_probabilities(outputs, size: tuple[int, int]) -> torch.Tensor:
    """The multi-band ensemble as the reference computes it (`evaluation_multi.py`,
    `getSudoLabel_multi.py`): each model's softmax at its output resolution, averaged, and the
    averaged probabilities upsampled to `size`."""
    mean = fda_lib.multi_band_ensemble([out.main.float().softmax(1) for out in outputs])
    return mean if tuple(mean.shape[-2:]) == tuple(size) else upsample(mean, size)


@torch.inference_mode()
def evaluate_ensemble(models: list[torch.nn.Module], dataset, batch_size: int, device: torch.device,
                      progress: bool = False, desc: str = "fda: ensemble") -> tuple[Evaluation, list[Evaluation]]:
    """The ensemble's evaluation on a labelled split (argmax of `ensemble_probabilities` at label
    size), and each model's own (argmax of its upsampled logits, as `evaluate`), in one pass."""
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    own = [torch.zeros_like(conf) for _ in models]
    entropy_sum, own_entropy, pixels = 0.0, [0.0] * len(models), 0
    for model in models:
        model.eval()
    for images, labels in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc=desc,
                               disable=not progress, dynamic_ncols=True):
        images = images.to(device)
        size = tuple(labels.shape[-2:])
        outputs = [model(images) for model in models]
        probs = ensemble_probabilities(outputs, size)
        entropy = normalised_entropy(probs)
        entropy_sum += float(entropy.sum())
        pixels += entropy.numel()
        conf += confusion_matrix(probs.argmax(1).cpu(), labels, NUM_CLASSES)
        for k, out in enumerate(outputs):
            single = upsample(out.main.float(), size).softmax(1)
            own_entropy[k] += float(normalised_entropy(single).sum())
            own[k] += confusion_matrix(single.argmax(1).cpu(), labels, NUM_CLASSES)
    return (Evaluation(conf, entropy_sum / max(pixels, 1)),
            [Evaluation(c, e / max(pixels, 1)) for c, e in zip(own, own_entropy)])


def ensemble_results(runner: RoundRunner, betas: list[float], inits: list[str]) -> tuple[dict, dict]:
    """The multi-band ensemble (the paper's MBT result) and each band model on target val and
    test: `{"val": summary, "test": summary, "bands": {beta: {"val_miou", "test_miou"}}}`, and
    the ensemble's `validation_metrics` (the schema of a stage's `val`)."""
    models = [runner.model(init) for init in inits]
    params, target = runner.params, runner.job.prepared / "target"
    result: dict = {"bands": {f"{b:g}": {} for b in betas}}
    for split in ("val", "test"):
        dataset = PreparedSplit(target, split, cache=False)
        ensemble, bands = evaluate_ensemble(models, dataset, params.engine.eval_batch_size, runner.device,
                                            runner.job.progress, f"fda: ensemble on target {split}")
        result[split] = ensemble.summary()
        if split == "val":
            val_metrics = validation_metrics(ensemble)
        for beta, band in zip(betas, bands):
            result["bands"][f"{beta:g}"][f"{split}_miou"] = band.summary()["miou"]
    return result, val_metrics


def ensemble_pseudo_labels(runner: RoundRunner, inits: list[str]) -> tuple[dict, dict]:
    """`getSudoLabel_multi.py`: argmax of the models' mean softmax (`ensemble_probabilities`); per
    predicted class, the confidence of rank round(0.66 n) among that class's n pixels of the whole
    target train set (`fda.class_thresholds`), capped at 0.9; pixels below their class's threshold
    are ignored. Confidences are kept in float32, as the rule ranks exact values."""
    models = [runner.model(init) for init in inits]
    size = runner.image_size
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ids, outputs in runner.predict(models, "fda: ensemble pseudo-labels"):
        confidence, predicted = ensemble_probabilities(outputs, size).max(1)
        for sample_id, label, conf in zip(ids, predicted.to(torch.uint8).cpu(), confidence.cpu()):
            raw[sample_id] = (label, conf)
    thresholds = fda_lib.class_thresholds(torch.cat([label.reshape(-1) for label, _ in raw.values()]).long(),
                                          torch.cat([conf.reshape(-1) for _, conf in raw.values()]),
                                          NUM_CLASSES, fda_lib.DEFAULT_CLASS_QUANTILE,
                                          fda_lib.DEFAULT_THRESHOLD_CAP)
    labels = {sid: fda_lib.apply_class_thresholds(label.long(), conf, thresholds).to(torch.uint8).numpy()
              for sid, (label, conf) in raw.items()}
    kept = float(np.mean([np.mean(label != IGNORE_INDEX) for label in labels.values()]))
    return labels, {"images": len(labels), "labelled_pixels": kept,
                    "thresholds": [round(float(t), 6) for t in thresholds]}


def fda_rounds(runner: RoundRunner) -> dict:
    """Unlike LSE's and LabOR's rounds, each model here trains the stage's full `iterations`: the
    multi-band transfer averages *trained* FDA models (the paper trains each band, then the
    self-training round, to the end). Split four ways, every band model stops inside the dip that
    follows the switch to stylised inputs (target val 17 after 37 steps against 19 to 21 after
    150 on the built-in data), and the ensemble of three such models labels worse than any one.

    The ensemble of the band models is evaluated on target val and test (`ensemble`, and MLflow
    `fda_ensemble_*`): it is the paper's MBT number (`evaluation_multi.py`). Without the
    self-training round (`self_training: false`) it is also the stage's headline `val` / `test`
    (these keys of the returned extra replace the single selected model's in the stage metrics,
    whose own scores stay under `ensemble.bands`). The self-training round (`SStrain.py`) starts
    from the stage's init like the band models (`self_training_init: stage`) or from the trained
    `beta` band (`band`), at `beta`."""
    fda = runner.params.methods.fda
    betas = list(fda.ensemble_betas)
    steps = runner.cfg.iterations
    for beta in betas:
        name = f"beta-{beta:g}"
        spec = runner.round_spec(name, "fda", steps, source_and_target(), None, beta)
        runner.train(spec)
    inits = [f"beta-{b:g}/best.pt" for b in betas]
    results, val_metrics = ensemble_results(runner, betas, inits)
    ensemble = {"betas": betas, **results}
    runner.log({f"fda_ensemble_{split}_{key}": ensemble[split][key]
                for split in ("val", "test") for key in ("miou", "pixel_accuracy")})
    if not fda.self_training:
        return {"ensemble": ensemble, "headline": "ensemble", "val": val_metrics, "test": ensemble["test"]}
    name = "self-training"
    saved = runner.labelled_before(name)
    if saved is None:
        labels, report = ensemble_pseudo_labels(runner, inits)
        own = f"beta-{fda.beta:g}/best.pt" if fda.self_training_init == "band" else None
        data = source_and_target()
        data["pseudo"] = {"domain": "target", "ids": sorted(labels), "labels_dir": f"{name}/labels"}
        spec = runner.round_spec(name, "fda", steps, data, own, fda.beta)
        runner.save_round(spec, report, runner.write_labels(name, labels))
    else:
        spec, report = Round(**saved["round"]), saved["report"]
    runner.log({"fda_pseudo_labelled_pixels": report["labelled_pixels"]})
    runner.train(spec)
    return {"ensemble": {**ensemble, **report}, "headline": "selected_round"}


# -- LabOR ------------------------------------------------------------------------------------------

class LazyLabels(Mapping):
    """Target train ground truth read on demand (only the images the oracle is asked about)."""

    def __init__(self, dataset: PreparedSplit):
        self._paths = {row["sample_id"]: dataset.root / row["label"] for row in dataset.rows}

    def __getitem__(self, sample_id: str) -> np.ndarray:
        return read_label(self._paths[sample_id])

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


class AnnotationsPending(StageInputError):
    """The file annotator asked a person for labels that are not there yet."""


class AnswerError(StageInputError):
    """A person's label file that is not a PNG of the request's size holding train ids."""


class FileAnnotator:
    """A person labels the asked pixels: requests are written as masks (255 = label this pixel)
    to `<dir>/<stage>/requests/<id>.png`; the answers are read from `<dir>/<stage>/labels/<id>.png`
    (train ids; anything outside the request is ignored). Until every answer exists the stage
    stops with AnnotationsPending, and running it again continues from there."""

    def __init__(self, directory: Path, total_pixels: int):
        self.directory = directory
        self.books = labor_lib.OracleAnnotator(_AnswerFiles(self), total_pixels=total_pixels)
        self.stage = "default"

    def start_stage(self, name: str) -> None:
        self.stage = name
        self.books.start_stage(name)

    def answer_path(self, sample_id: str) -> Path:
        return label_file(self.directory / self.stage / "labels", sample_id)

    def reveal(self, sample_ids, masks) -> list[np.ndarray]:
        missing = []
        for sample_id, mask in zip(sample_ids, masks):
            request = label_file(self.directory / self.stage / "requests", sample_id)
            if not request.is_file():
                write_png(request, np.asarray(mask, np.uint8) * 255)
            if not self.answer_path(sample_id).is_file():
                missing.append(sample_id)
        if not missing:
            for sample_id, mask in zip(sample_ids, masks):
                self.check_answer(sample_id, np.asarray(mask).shape)
        if missing:
            raise AnnotationsPending(
                f"LabOR {self.stage}: {len(missing)} images wait for labels (first: {missing[0]}); "
                f"label the white pixels of {self.directory / self.stage / 'requests'}/<id>.png into "
                f"{self.directory / self.stage / 'labels'}/<id>.png (train ids, 255 elsewhere) and run the stage again")
        return self.books.reveal(sample_ids, masks)

    def check_answer(self, sample_id: str, shape: tuple[int, int]) -> None:
        """A person's label file is checked as an ingested one is: a PNG of the request's size
        holding train ids, read before it may reach the loss."""
        path = self.answer_path(sample_id)
        data = path.read_bytes()
        try:
            require_png(data, str(path))
        except ImageCheckError as error:
            raise AnswerError(f"{error}; save the answer as a PNG of train ids") from None
        size = header_size(data)
        if size != (shape[1], shape[0]):
            got = f"{size[0]}x{size[1]}" if size else "of unreadable size"
            raise AnswerError(f"{path}: the label is {got}, its request {shape[1]}x{shape[0]} "
                              "(width x height); label the request's image at its own size")
        bad = invalid_train_ids(read_label(path))
        if bad:
            raise AnswerError(f"{path}: train id(s) {bad[:10]} are neither a class (0..{NUM_CLASSES - 1}) "
                              f"nor ignore ({IGNORE_INDEX})")

    @property
    def ledger(self) -> list[dict]:
        return self.books.ledger

    @property
    def total_pixels(self) -> int:
        return self.books.total_pixels

    @property
    def revealed_share(self) -> float:
        return self.books.revealed_share


class _AnswerFiles(Mapping):
    def __init__(self, annotator: FileAnnotator):
        self._annotator = annotator

    def __getitem__(self, sample_id: str) -> np.ndarray:
        path = self._annotator.answer_path(sample_id)
        if not path.is_file():
            raise KeyError(sample_id)
        return read_label(path)

    def __contains__(self, sample_id) -> bool:
        return self._annotator.answer_path(sample_id).is_file()

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def build_annotator(runner: RoundRunner):
    labor = runner.params.methods.labor
    dataset = PreparedSplit(runner.job.prepared / "target", "train")
    total = sum(row["height"] * row["width"] for row in dataset.rows)
    if labor.annotator == "files":
        return FileAnnotator(runner.job.path(labor.annotations), total)
    return labor_lib.OracleAnnotator(LazyLabels(dataset), total_pixels=total)


def model_pseudo_labels(runner: RoundRunner, init: str | None, desc: str) -> dict[str, np.ndarray]:
    """Model A's argmax on target train: what the pixel selector learns to reproduce."""
    model, size = runner.model(init), runner.image_size
    labels = {}
    for ids, (out,) in runner.predict([model], desc):
        for sample_id, label in zip(ids, probabilities(out, size).argmax(1).cpu().numpy()):
            labels[sample_id] = label.astype(np.uint8)
    return labels


def selector_from(path: Path, runner: RoundRunner) -> labor_lib.TwoHeadSegmenter:
    from segshift.components.models.factory import build_model
    selector = labor_lib.TwoHeadSegmenter(build_model(runner.params.model.model_copy(update={"pretrained": None})))
    selector.load_state_dict(load_checkpoint(path)["model"])
    return selector.to(runner.device).eval()


def select_pixels(runner: RoundRunner, selector_path: Path, asked_before: dict[str, np.ndarray],
                  stages_left: int, points: int, desc: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per target image: the selector's inconsistency mask (pixels asked for in earlier stages
    removed: an answer, void included, is not asked for twice) and the pixels this stage asks for. SPL: the mask, capped per image at its share of
    `label_budget` left over `stages_left` stages (`spl_stage_share`), most uncertain pixels
    first; PPL: `points` prototype points (this stage's part of `points_per_image`)."""
    labor = runner.params.methods.labor
    selector, size = selector_from(selector_path, runner), runner.image_size
    masks, asked = {}, {}
    for ids, (out,) in runner.predict([selector], desc):
        probs_a = upsample(out.a.float(), size).softmax(1)
        probs_b = upsample(out.b.float(), size).softmax(1)
        mask = labor_lib.inconsistency_mask(probs_a, probs_b).cpu().numpy()
        for k, sample_id in enumerate(ids):
            if sample_id in asked_before:
                mask[k] &= ~asked_before[sample_id]
        if labor.selection == "spl":
            discrepancy = labor_lib.pixel_discrepancy(probs_a, probs_b).cpu().numpy()
            chosen = np.zeros_like(mask)
            for k, sample_id in enumerate(ids):
                known = int(asked_before[sample_id].sum()) if sample_id in asked_before else 0
                share = labor_lib.spl_stage_share(labor.label_budget, mask[k].size, known, stages_left)
                if share > 0:
                    chosen[k] = labor_lib.segment_based_selection(mask[k], share, discrepancy[k])
        elif points > 0:
            chosen = labor_lib.prototype_point_selection(mask, ((probs_a + probs_b) / 2).cpu().numpy(), points)
        else:
            chosen = np.zeros_like(mask)
        for k, sample_id in enumerate(ids):
            masks[sample_id] = mask[k]
            if chosen[k].any():
                asked[sample_id] = chosen[k]
    return masks, asked


def merge_revealed(revealed: dict[str, np.ndarray], ids: list[str], answers: list[np.ndarray]) -> None:
    for sample_id, answer in zip(ids, answers):
        current = revealed.setdefault(sample_id, np.full(answer.shape, IGNORE_INDEX, np.uint8))
        known = answer != IGNORE_INDEX
        current[known] = answer[known]


def white(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def labor_picture(runner: RoundRunner, masks: dict, asked: dict, revealed: dict, stage: str) -> None:
    """Target images with the selector's disagreement, the asked pixels and the labels so far."""
    from segshift.components.visualize import colorize, denormalise, grid
    dataset = runner.target_train
    index = {row["sample_id"]: i for i, row in enumerate(dataset.rows)}
    rows = [[denormalise(dataset[index[sample_id]][0].numpy()), white(masks[sample_id]),
             white(asked[sample_id]), colorize(revealed[sample_id])] for sample_id in sorted(asked)[:4]]
    if not rows:
        return
    out = runner.job.path(runner.params.paths.reports) / runner.job.stage / f"labor_{stage}.png"
    write_png(out, grid(rows))
    if runner.tracker is not None:
        runner.tracker.log_artifact(out, "labor")


def check_budget(annotator, asked: dict[str, np.ndarray], asked_before: dict[str, np.ndarray], labor) -> None:
    """The paper's budgets, checked before anything is revealed: SPL at most `label_budget` of the
    target pixels over all stages; PPL at most `points_per_image` points per image over all stages
    (its budget is clicks, not a share of the pixels)."""
    if labor.selection == "ppl":
        for sample_id, mask in asked.items():
            known = int(asked_before[sample_id].sum()) if sample_id in asked_before else 0
            if known + int(mask.sum()) > labor.points_per_image:
                raise StageInputError(f"methods.labor: image {sample_id} would get {known + int(mask.sum())} "
                                      f"points, over points_per_image = {labor.points_per_image} in all stages")
        return
    asking = sum(int(mask.sum()) for mask in asked.values()) / annotator.total_pixels
    if annotator.revealed_share + asking > labor.label_budget + 1e-9:
        raise StageInputError(
            f"methods.labor: this stage asks for {100 * asking:.2f} % of target pixels on top of "
            f"{100 * annotator.revealed_share:.2f} % revealed, over label_budget = {labor.label_budget}")


def labor_warmup(runner: RoundRunner) -> str | None:
    """Model A as in the paper: a UDA model, adapted adversarially (AdaptSegNet's output-space
    discriminator) before the first pixels are chosen. The `adapt` round trains the stage's init
    for `adapt_iterations` steps with the labor-model step on source + target images none of
    whose pixels is revealed yet (all IGNORE): source cross-entropy + the adversarial loss. Its
    model starts stage 1; it is not a candidate for the stage's model (it has seen no labels).
    None (0 steps): stage 1 starts from the stage's init, segshift's earlier behaviour."""
    labor = runner.params.methods.labor
    if labor.adapt_iterations == 0:
        return None
    name = "adapt"
    saved = runner.labelled_before(name)
    if saved is None:
        shape = runner.image_size
        ids = [row["sample_id"] for row in runner.target_train.rows]
        blank = {sample_id: np.full(shape, IGNORE_INDEX, np.uint8) for sample_id in ids}
        runner.need_images(name, ids)
        spec = runner.round_spec(name, "labor-model", labor.adapt_iterations,
                                 source_and_target(f"{name}/labels", sorted(ids), "annotated"), None)
        runner.save_round(spec, {"iterations": labor.adapt_iterations}, runner.write_labels(name, blank))
    else:
        spec = Round(**saved["round"])
    runner.train(spec)
    runner.candidates = [c for c in runner.candidates if c[0] != name]
    return f"{name}/best.pt"


def labor_rounds(runner: RoundRunner) -> dict:
    """Runs the labelling stages; returns the annotator's books, for the stage's metrics.

    Budgets, as the paper's (all stages together): SPL at most `label_budget` (2.2 %) of each
    target image's pixels, PPL `points_per_image` (40) points per image, split over the stages
    (`points_per_stage`: 14, 13, 13)."""
    labor = runner.params.methods.labor
    annotator = build_annotator(runner)
    revealed: dict[str, np.ndarray] = {}
    asked_before: dict[str, np.ndarray] = {}      # every pixel asked for so far (the labelling cost)
    init = labor_warmup(runner)
    model_steps = split_iterations(runner.cfg.iterations, labor.stages)
    stage_points = labor_lib.points_per_stage(labor.points_per_image, labor.stages)
    for k in range(1, labor.stages + 1):
        stage = f"stage-{k}"
        annotator.start_stage(stage)
        selector_name = f"{stage}-selector"
        saved = runner.labelled_before(selector_name)
        if saved is None:
            labels = model_pseudo_labels(runner, init, f"labor {stage}: model A's predictions")
            spec = runner.round_spec(selector_name, "labor-selector", labor.selector_iterations,
                                     {"pseudo": {"domain": "target", "ids": sorted(labels),
                                                 "labels_dir": f"{selector_name}/labels"}}, init)
            runner.save_round(spec, {}, runner.write_labels(selector_name, labels))
        else:
            spec = Round(**saved["round"])
        selector_job, _ = runner.train(spec)
        masks, asked = select_pixels(runner, selector_job.checkpoint_dir / "best.pt", asked_before,
                                     labor.stages - k + 1, stage_points[k - 1], f"labor {stage}: selection")
        ids = sorted(asked)
        check_budget(annotator, asked, asked_before, labor)
        merge_revealed(revealed, ids, annotator.reveal(ids, [asked[i] for i in ids]))
        for sample_id in ids:
            asked_before[sample_id] = asked_before.get(sample_id, np.zeros_like(asked[sample_id])) | asked[sample_id]
        labor_picture(runner, masks, asked, revealed, stage)
        book = annotator.ledger[-1]
        runner.log({"labor_labelled_share": annotator.revealed_share, "labor_stage_pixels": book["pixels"],
                    "labor_stage_regions": book["regions"]})
        runner.need_images(stage, list(revealed))
        data = source_and_target(f"{stage}/labels", sorted(revealed), "annotated")
        spec = runner.round_spec(stage, "labor-model", model_steps[k - 1], data, init)
        runner.save_round(spec, book, runner.write_labels(stage, revealed))
        runner.train(spec)
        init = f"{stage}/best.pt"
    most_points = max((int(m.sum()) for m in asked_before.values()), default=0)   # asked, void included
    budget = ({"label_budget": labor.label_budget, "unit": "share of target pixels, all stages"}
              if labor.selection == "spl" else
              {"points_per_image": labor.points_per_image, "points_per_stage": stage_points,
               "unit": "points per image, all stages"})
    return {"labels": {"share": annotator.revealed_share, "annotator": labor.annotator,
                       "selection": labor.selection, "budget": labor.label_budget,
                       "allowance": budget, "most_pixels_per_image": most_points,
                       "adapt_iterations": labor.adapt_iterations, "stages": annotator.ledger}}

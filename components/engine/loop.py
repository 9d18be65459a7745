"""The training loop every stage and method runs: written once.

It owns what is not specific to a method: devices, AMP, DDP wrapping, gradient accumulation, the
poly schedule, logging of cross-rank mean losses, validation and checkpoint selection, resumable
checkpoints and stopping on a non-finite loss with the last good checkpoint kept.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from segshift.components.config import EngineConfig
from segshift.components.engine.checkpoint import (OutdatedCheckpointError, capture_rng_state, load_checkpoint,
                                                   restore_rng_state, save_checkpoint)
from segshift.components.engine.optim import set_poly_lr
from segshift.components.engine.precision import Hardware, PrecisionError, SpeedSettings, resolve_speed
from segshift.components.methods.base import Batch, Method

CHECKPOINT_FORMAT = 1
BatchSource = Callable[[str, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


class EngineError(ValueError):
    """A training setting the current machine or data cannot honour."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the checkpoint kept."""


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank among `world_size` workers and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("engine.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def speed_settings(cfg: EngineConfig, device: torch.device) -> SpeedSettings:
    """`engine.amp` and `engine.channels_last` resolved for this device (`auto` by capability)."""
    try:
        return resolve_speed(cfg.amp, cfg.channels_last, Hardware.detect(device))
    except PrecisionError as exc:
        raise EngineError(str(exc)) from None


@dataclass
class Selection:
    """The kept checkpoint: best validation value so far (higher or lower is better)."""

    metric: str
    value: float | None = None
    step: int | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric.endswith("miou")

    def improves(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.higher_is_better else value < self.value


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    selection: Selection
    history: list[dict[str, float]] = field(default_factory=list)
    val_curve: list[dict[str, float]] = field(default_factory=list)   # every validation: step + metrics
    last_validation: dict[str, float] = field(default_factory=dict)
    earlier_seconds: float = 0.0    # training time of the runs this one resumed, from last.pt


class Trainer:
    """Runs `method` for `iterations` optimiser steps, resuming from `checkpoint_path` if it matches."""

    def __init__(self, method: Method, cfg: EngineConfig, iterations: int, accumulation: int,
                 checkpoint_path: Path, best_path: Path, fingerprint: str, runtime: Runtime,
                 validate: Callable[[nn.Module], dict[str, float]] | None = None,
                 on_log: Callable[[dict[str, float], int], None] | None = None,
                 on_validation: Callable[[dict[str, float], int], None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None,
                 progress: bool = True, desc: str = "train", speed: SpeedSettings | None = None):
        self.speed = speed or speed_settings(cfg, runtime.device)
        self.method, self.cfg, self.runtime = method, cfg, runtime
        self.iterations, self.accumulation = iterations, accumulation
        self.checkpoint_path, self.best_path, self.fingerprint = checkpoint_path, best_path, fingerprint
        self.validate, self.on_log = validate, on_log or (lambda metrics, step: None)
        # called on every rank after each validation (rank 0 with the metrics, others with {}):
        # a collective report such as Ray Train's must be made by all workers
        self.on_validation = on_validation or (lambda metrics, step: None)
        # called on rank 0 with each checkpoint file just written, e.g. to copy it to S3
        self.on_checkpoint = on_checkpoint or (lambda path: None)
        self.progress, self.desc = progress and runtime.is_main, desc
        self.scaler = torch.amp.GradScaler("cuda") if self.speed.amp == "fp16" else None
        self.selection = Selection(metric=cfg.selection)

    # -- setup -----------------------------------------------------------------------------
    def _place_modules(self) -> None:
        memory_format = self.speed.memory_format
        for name, module in list(self.method.modules.items()):
            module.to(self.runtime.device, memory_format=memory_format)
            has_grad = any(p.requires_grad for p in module.parameters())
            if self.runtime.world_size > 1 and has_grad:
                ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
                self.method.modules[name] = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        for spec in self.method.optimizers.values():
            _optimizer_to(spec.optimizer, self.runtime.device)

    def _modules_unwrapped(self) -> dict[str, nn.Module]:
        return {n: unwrap(m) for n, m in self.method.modules.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.speed.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> int:
        """Load the last checkpoint if it belongs to this configuration; return the next step."""
        if not self.checkpoint_path.is_file():
            return 0
        try:
            state = load_checkpoint(self.checkpoint_path)
        except OutdatedCheckpointError:
            # a resume point of an older segshift, not a result: nothing is lost by training afresh
            if self.runtime.is_main:
                tqdm.write(f"{self.checkpoint_path}: written by an older segshift; starting afresh")
            return 0
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint:
            if self.runtime.is_main:
                tqdm.write(f"{self.checkpoint_path}: from another configuration; starting afresh")
            return 0
        for name, module in self._modules_unwrapped().items():
            module.load_state_dict(state["modules"][name])
        for name, spec in self.method.optimizers.items():
            spec.optimizer.load_state_dict(state["optimizers"][name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.selection = Selection(**state["selection"])
        self._history = state.get("history", [])
        self._val_curve = state.get("val_curve", [])
        self._earlier_seconds = float(state.get("seconds", 0.0))
        if self.runtime.is_main:
            tqdm.write(f"resuming {self.desc} from step {state['step']} ({self.checkpoint_path})")
        return int(state["step"])

    def _save_last(self, step: int) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
            "modules": {n: m.state_dict() for n, m in self._modules_unwrapped().items()},
            "optimizers": {n: s.optimizer.state_dict() for n, s in self.method.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "selection": {"metric": self.selection.metric, "value": self.selection.value,
                          "step": self.selection.step},
            "history": self._history,
            "val_curve": self._val_curve,
            # so that a resumed run can report the time the whole training took, not its own part
            "seconds": self._earlier_seconds + time.perf_counter() - self._started,
        }
        self.on_checkpoint(save_checkpoint(self.checkpoint_path, payload))

    def _save_best(self, step: int, metrics: dict[str, float]) -> None:
        self.on_checkpoint(save_checkpoint(self.best_path, {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step,
            "model": self.method.segmenter.state_dict(), "selection": self.selection.metric,
            "metrics": metrics}))

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, batches: BatchSource) -> TrainResult:
        self._history: list[dict[str, float]] = []
        self._val_curve: list[dict[str, float]] = []
        self._earlier_seconds, self._started = 0.0, time.perf_counter()
        start = self._resume()
        self._place_modules()
        streams = {role: batches(role, start * self.accumulation) for role in self.method.roles}
        for module in self.method.modules.values():
            module.train()
        last_validation: dict[str, float] = {}
        bar = tqdm(total=self.iterations, initial=start, desc=self.desc, disable=not self.progress,
                   dynamic_ncols=True, unit="step")
        try:
            for step in range(start, self.iterations):
                metrics = self._optimise_one_step(streams, step)
                if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.iterations:
                    self._history.append({"step": step + 1, **metrics})
                    self.on_log(metrics, step + 1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if (step + 1) % self.cfg.val_every == 0 or step + 1 == self.iterations:
                    last_validation = self._validate_and_select(step + 1)
                if (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.iterations:
                    if self.runtime.is_main:
                        self._save_last(step + 1)
                    self._barrier()
                bar.update()
        finally:
            bar.close()
        return TrainResult(steps=self.iterations, resumed_from=start, selection=self.selection,
                           history=self._history, val_curve=self._val_curve,
                           last_validation=last_validation,
                           earlier_seconds=self._earlier_seconds)

    def _optimise_one_step(self, streams: dict[str, Iterator], step: int) -> dict[str, float]:
        for spec in self.method.optimizers.values():
            set_poly_lr(spec.optimizer, spec.config.lr, step, self.iterations, spec.config.poly_power)
            spec.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for _ in range(self.accumulation):
            batch = self._next_batch(streams)
            with self._autocast():
                logs = self.method.training_step(batch, step, self._backward)
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + value.float() / self.accumulation
        metrics = self._mean_over_ranks(totals)
        bad = {name: v for name, v in metrics.items() if not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(
                f"{self.desc}: non-finite loss at step {step + 1} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                f"last good checkpoint kept at {self.checkpoint_path if self.checkpoint_path.exists() else 'none yet'}")
        for spec in self.method.optimizers.values():
            if self.scaler is not None:
                self.scaler.step(spec.optimizer)
            else:
                spec.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        metrics["lr"] = self.method.optimizers["model"].optimizer.param_groups[0]["lr"] \
            if "model" in self.method.optimizers else 0.0
        return metrics

    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _next_batch(self, streams: dict[str, Iterator]) -> Batch:
        memory_format = self.speed.memory_format
        batch = {}
        for role, stream in streams.items():
            images, labels = next(stream)
            batch[role] = (images.to(self.runtime.device, non_blocking=True, memory_format=memory_format),
                           labels.to(self.runtime.device, non_blocking=True))
        return batch

    def _mean_over_ranks(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(totals)
        values = torch.stack([torch.as_tensor(totals[n], dtype=torch.float32) for n in names])
        values = values.to(self.runtime.device)
        if self.runtime.world_size > 1:
            dist.all_reduce(values)
            values /= self.runtime.world_size
        return dict(zip(names, values.tolist()))

    def _validate_and_select(self, step: int) -> dict[str, float]:
        metrics = self._validate_on_main(step)
        self.on_validation(metrics, step)
        return metrics

    def _validate_on_main(self, step: int) -> dict[str, float]:
        if not self.runtime.is_main:
            self._barrier()
            return {}
        if self.validate is None:   # nothing to select with: the final model is the one kept
            if step == self.iterations:
                self.selection.step = step
                self._save_best(step, {})
            self._barrier()
            return {}
        model = self.method.segmenter
        model.eval()
        try:
            metrics = self.validate(model)
        finally:
            model.train()
        self._val_curve.append({"step": step, **metrics})
        value = metrics[self.selection.metric]
        if self.selection.improves(value):
            self.selection.value, self.selection.step = value, step
            self._save_best(step, metrics)
        self.on_log(metrics, step)
        self._barrier()
        return metrics

    def _barrier(self) -> None:
        if self.runtime.world_size > 1 and dist.is_initialized():
            dist.barrier()


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Optimiser state restored from a CPU checkpoint must follow the parameters to the device."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


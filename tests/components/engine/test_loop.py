"""The shared training loop: resume, selection, divergence, AMP, parameter groups."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from segshift.components.config import load_params
from segshift.components.data.builtin import BuiltinSpec, write_builtin_domain
from segshift.components.data.dataset import PreparedSplit, StepBatchSampler
from segshift.components.engine.checkpoint import load_checkpoint
from segshift.components.engine.loop import EngineError, Runtime, Trainer, TrainingDiverged
from segshift.components.engine.optim import poly_lr
from segshift.components.engine.precision import Hardware, resolve_speed
from segshift.components.methods.supervised import Supervised
from segshift.components.models.factory import build_model
from tests.components.engine.test_precision import AVX2_CPU, AVX512_BF16_CPU
from tests.conftest import REPO

COUNTS = {"source_train": 8, "source_val": 1, "target_train": 1, "target_val": 1, "target_test": 1}


@pytest.fixture(scope="module")
def source_train(tmp_path_factory) -> PreparedSplit:
    root = tmp_path_factory.mktemp("prepared") / "source"
    spec = BuiltinSpec(seed=0, height=32, width=64, appearance_gap=1.0, conditions=(("clear", 1.0),))
    write_builtin_domain(spec, COUNTS, "source", root, workers=1, progress=False)
    return PreparedSplit(root, "train", cache=True, flip=True)


def params(**overrides):
    base = {"engine.log_every": 1, "engine.val_every": 2, "engine.checkpoint_every": 2,
            "model.width": 0.125, "source.iterations": 6, "source.batch_size": 4}
    return load_params(REPO / "params.yaml", {**base, **overrides})


def make_trainer(p, tmp: Path, validate=None, on_log=None, fingerprint="f1", iterations=None, speed=None):
    torch.manual_seed(0)
    method = Supervised(build_model(p.model), p.source)
    return Trainer(method, p.engine, iterations or p.source.iterations, p.source.accumulation,
                   checkpoint_path=tmp / "last.pt", best_path=tmp / "best.pt", fingerprint=fingerprint,
                   runtime=Runtime(), validate=validate, on_log=on_log, progress=False, speed=speed)


def batches(dataset, p):
    def make(role, start):
        sampler = StepBatchSampler(len(dataset), p.source.batch_size, 0, 0, start,
                                   p.source.iterations * p.source.accumulation)
        return iter(DataLoader(dataset, batch_sampler=sampler))
    return make


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, source_train):
    p = params()
    straight = make_trainer(p, tmp_path / "a")
    result = straight.fit(batches(source_train, p))

    def crash_after_step_three(metrics, step):
        if step == 4:
            raise KeyboardInterrupt
    interrupted = make_trainer(p, tmp_path / "b", on_log=crash_after_step_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(batches(source_train, p))
    kept = load_checkpoint(tmp_path / "b" / "last.pt")
    assert kept["step"] == 2                                            # the last checkpoint kept
    assert kept["seconds"] > 0                                          # and the time it took

    resumed = make_trainer(p, tmp_path / "b")
    resumed_result = resumed.fit(batches(source_train, p))
    assert resumed_result.resumed_from == 2
    # the time of the interrupted part is carried on, so a stage reports its whole training time
    assert resumed_result.earlier_seconds == kept["seconds"] and result.earlier_seconds == 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["seconds"] > kept["seconds"]
    a, b = straight.method.segmenter.state_dict(), resumed.method.segmenter.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    losses = lambda r: [h["loss"] for h in r.history if h["step"] > 2]
    assert losses(resumed_result) == pytest.approx(losses(result), rel=1e-6)


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, source_train):
    p = params()
    make_trainer(p, tmp_path).fit(batches(source_train, p))
    again = make_trainer(p, tmp_path, fingerprint="other").fit(batches(source_train, p))
    assert again.resumed_from == 0


def test_selection_keeps_the_best_validated_checkpoint(tmp_path, source_train):
    p = params()
    scores = iter([0.2, 0.5, 0.3])
    trainer = make_trainer(p, tmp_path, validate=lambda m: {"val_miou": next(scores), "val_entropy": 0.1})
    result = trainer.fit(batches(source_train, p))
    assert (result.selection.step, result.selection.value) == (4, 0.5)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["metrics"]["val_miou"] == 0.5


def test_entropy_selection_prefers_lower(tmp_path, source_train):
    p = params(**{"engine.selection": "val_entropy"})
    scores = iter([0.4, 0.1, 0.3])
    trainer = make_trainer(p, tmp_path, validate=lambda m: {"val_miou": 0.0, "val_entropy": next(scores)})
    assert trainer.fit(batches(source_train, p)).selection.step == 4


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, source_train):
    p = params()
    trainer = make_trainer(p, tmp_path)
    original = trainer.method.training_step

    def poisoned(batch, step, backward):
        logs = original(batch, step, backward)
        if step == 4:
            logs["loss"] = torch.tensor(float("nan"))
        return logs
    trainer.method.training_step = poisoned
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 5 .*loss=nan.*last.pt"):
        trainer.fit(batches(source_train, p))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4


def test_bf16_autocast_trains_on_cpu(tmp_path, source_train):
    p = params(**{"engine.amp": "bf16", "source.iterations": 2})
    result = make_trainer(p, tmp_path).fit(batches(source_train, p))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def spy_on_step(trainer) -> list[tuple[torch.dtype, bool]]:
    """Record, per training step, the dtype of the logits and whether images came channels-last."""
    seen, model, step = [], trainer.method.modules["model"], trainer.method.training_step

    def spied(batch, i, backward):
        images = batch["labelled"][0]
        seen.append((model(images).main.dtype, images.is_contiguous(memory_format=torch.channels_last)))
        return step(batch, i, backward)
    trainer.method.training_step = spied
    return seen


@pytest.mark.parametrize("hardware, dtype, channels_last", [(AVX2_CPU, torch.float32, False),
                                                            (AVX512_BF16_CPU, torch.bfloat16, False)])
def test_a_step_under_auto_runs_in_the_precision_the_hardware_does_well(tmp_path, source_train, hardware, dtype,
                                                                          channels_last):
    p = params(**{"engine.amp": "auto", "engine.channels_last": "auto", "source.iterations": 1})
    trainer = make_trainer(p, tmp_path, speed=resolve_speed("auto", "auto", hardware))
    seen = spy_on_step(trainer)
    trainer.fit(batches(source_train, p))
    assert seen == [(dtype, channels_last)]


def test_auto_on_this_machine_follows_its_detected_hardware(tmp_path, source_train):
    p = params(**{"engine.amp": "auto", "engine.channels_last": False, "source.iterations": 1})
    trainer = make_trainer(p, tmp_path)
    seen = spy_on_step(trainer)
    trainer.fit(batches(source_train, p))
    native = Hardware.detect(torch.device("cpu")).native_bf16
    assert trainer.speed.amp == ("bf16" if native else "none")
    assert seen == [(torch.bfloat16 if native else torch.float32, False)]


def test_fp16_needs_cuda(tmp_path):
    p = params(**{"engine.amp": "fp16"})
    with pytest.raises(EngineError, match="fp16.*CUDA"):
        make_trainer(p, tmp_path)


def test_heads_train_at_ten_times_the_backbone_rate(tmp_path, source_train):
    p = params(**{"source.iterations": 1, "source.optimizer.head_lr_mult": 10})
    trainer = make_trainer(p, tmp_path)
    trainer.fit(batches(source_train, p))
    lrs = [g["lr"] for g in trainer.method.optimizers["model"].optimizer.param_groups]
    assert lrs[1] == pytest.approx(10 * lrs[0])
    assert lrs[0] == pytest.approx(p.source.optimizer.lr)   # step 0 of the poly schedule


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0

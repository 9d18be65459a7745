"""LabOR's labelling stages, between its training rounds.

Per labelling stage, a pixel selector (two heads, trained on model A's predictions) marks where its
heads disagree; SPL/PPL choose pixels within the stage's share of the budget; the annotator (the
oracle, or a person via files) reveals them; model A trains on source plus every target pixel
revealed so far. Before stage 1, model A is adapted adversarially (`warmup`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.engine.checkpoint import load_checkpoint
from segshift.components.io import write_png
from segshift.components.losses import upsample
from segshift.components.methods.labor import step as labor_step
from segshift.components.methods.labor.annotators import build_annotator
from segshift.components.methods.rounds import (Round, RoundContext, StageInputError, probabilities,
                                                source_and_target, split_iterations)
from segshift.components.models.classes import model_protocol, to_train_ids


def model_pseudo_labels(context: RoundContext, init: str | None, desc: str) -> dict[str, np.ndarray]:
    """Model A's argmax on target train, as train ids: what the pixel selector learns to reproduce."""
    model, size = context.model(init), context.image_size
    protocol = model_protocol(model)
    labels = {}
    for ids, (out,) in context.predict([model], desc):
        for sample_id, label in zip(ids, probabilities(out, size).argmax(1).cpu().numpy()):
            labels[sample_id] = to_train_ids(label.astype(np.uint8), protocol)
    return labels


def selector_from(path: Path, context: RoundContext) -> labor_step.TwoHeadSegmenter:
    from segshift.components.models.factory import build_model
    selector = labor_step.TwoHeadSegmenter(build_model(context.params.model.model_copy(update={"pretrained": None})))
    selector.load_state_dict(load_checkpoint(path)["model"])
    return selector.to(context.device).eval()


def select_pixels(context: RoundContext, selector_path: Path, asked_before: dict[str, np.ndarray],
                  stages_left: int, points: int, desc: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per target image: the selector's inconsistency mask (pixels asked for in earlier stages
    removed: an answer, void included, is not asked for twice) and the pixels this stage asks for. SPL: the mask, capped per image at its share of
    `label_budget` left over `stages_left` stages (`spl_stage_share`), most uncertain pixels
    first; PPL: `points` prototype points (this stage's part of `points_per_image`)."""
    labor = context.params.methods.labor
    selector, size = selector_from(selector_path, context), context.image_size
    masks, asked = {}, {}
    for ids, (out,) in context.predict([selector], desc):
        probs_a = upsample(out.a.float(), size).softmax(1)
        probs_b = upsample(out.b.float(), size).softmax(1)
        mask = labor_step.inconsistency_mask(probs_a, probs_b).cpu().numpy()
        for k, sample_id in enumerate(ids):
            if sample_id in asked_before:
                mask[k] &= ~asked_before[sample_id]
        if labor.selection == "spl":
            discrepancy = labor_step.pixel_discrepancy(probs_a, probs_b).cpu().numpy()
            chosen = np.zeros_like(mask)
            for k, sample_id in enumerate(ids):
                known = int(asked_before[sample_id].sum()) if sample_id in asked_before else 0
                share = labor_step.spl_stage_share(labor.label_budget, mask[k].size, known, stages_left)
                if share > 0:
                    chosen[k] = labor_step.segment_based_selection(mask[k], share, discrepancy[k])
        elif points > 0:
            chosen = labor_step.prototype_point_selection(mask, ((probs_a + probs_b) / 2).cpu().numpy(), points)
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


def picture(context: RoundContext, masks: dict, asked: dict, revealed: dict, stage: str) -> None:
    """Target images with the selector's disagreement, the asked pixels and the labels so far."""
    from segshift.components.visualize import colorize, denormalise, grid
    dataset = context.target_train
    index = {row["sample_id"]: i for i, row in enumerate(dataset.rows)}
    rows = [[denormalise(dataset[index[sample_id]][0].numpy()), white(masks[sample_id]),
             white(asked[sample_id]), colorize(revealed[sample_id])] for sample_id in sorted(asked)[:4]]
    if not rows:
        return
    out = context.path(context.params.paths.reports) / context.stage / f"labor_{stage}.png"
    write_png(out, grid(rows))
    context.log_artifact(out, "labor")


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


def warmup(context: RoundContext) -> str | None:
    """Model A as in the paper: a UDA model, adapted adversarially (AdaptSegNet's output-space
    discriminator) before the first pixels are chosen. The `adapt` round trains the stage's init
    for `adapt_iterations` steps with the labor-model step on source + target images none of
    whose pixels is revealed yet (all IGNORE): source cross-entropy + the adversarial loss. Its
    model starts stage 1; it is not a candidate for the stage's model (it has seen no labels).
    None (0 steps): stage 1 starts from the stage's init, segshift's earlier behaviour."""
    labor = context.params.methods.labor
    if labor.adapt_iterations == 0:
        return None
    name = "adapt"
    saved = context.labelled_before(name)
    if saved is None:
        shape = context.image_size
        ids = [row["sample_id"] for row in context.target_train.rows]
        blank = {sample_id: np.full(shape, IGNORE_INDEX, np.uint8) for sample_id in ids}
        context.need_images(name, ids)
        spec = context.round_spec(name, "labor-model", labor.adapt_iterations,
                                 source_and_target(f"{name}/labels", sorted(ids), "annotated"), None)
        context.save_round(spec, {"iterations": labor.adapt_iterations}, context.write_labels(name, blank))
    else:
        spec = Round(**saved["round"])
    context.train(spec, candidate=False)
    return f"{name}/best.pt"


def rounds(context: RoundContext) -> dict:
    """Runs the labelling stages; returns the annotator's books, for the stage's metrics.

    Budgets, as the paper's (all stages together): SPL at most `label_budget` (2.2 %) of each
    target image's pixels, PPL `points_per_image` (40) points per image, split over the stages
    (`points_per_stage`: 14, 13, 13)."""
    labor = context.params.methods.labor
    annotator = build_annotator(context)
    revealed: dict[str, np.ndarray] = {}
    asked_before: dict[str, np.ndarray] = {}      # every pixel asked for so far (the labelling cost)
    init = warmup(context)
    model_steps = split_iterations(context.cfg.iterations, labor.stages)
    stage_points = labor_step.points_per_stage(labor.points_per_image, labor.stages)
    for k in range(1, labor.stages + 1):
        stage = f"stage-{k}"
        annotator.start_stage(stage)
        selector_name = f"{stage}-selector"
        saved = context.labelled_before(selector_name)
        if saved is None:
            labels = model_pseudo_labels(context, init, f"labor {stage}: model A's predictions")
            spec = context.round_spec(selector_name, "labor-selector", labor.selector_iterations,
                                     {"pseudo": {"domain": "target", "ids": sorted(labels),
                                                 "labels_dir": f"{selector_name}/labels"}}, init)
            context.save_round(spec, {}, context.write_labels(selector_name, labels))
        else:
            spec = Round(**saved["round"])
        context.train(spec, candidate=False)      # the selector is not a segmentation model of the stage
        masks, asked = select_pixels(context, context.stage_dir / spec.name / "best.pt", asked_before,
                                     labor.stages - k + 1, stage_points[k - 1], f"labor {stage}: selection")
        ids = sorted(asked)
        check_budget(annotator, asked, asked_before, labor)
        merge_revealed(revealed, ids, annotator.reveal(ids, [asked[i] for i in ids]))
        for sample_id in ids:
            asked_before[sample_id] = asked_before.get(sample_id, np.zeros_like(asked[sample_id])) | asked[sample_id]
        picture(context, masks, asked, revealed, stage)
        book = annotator.ledger[-1]
        context.log({"labor_labelled_share": annotator.revealed_share, "labor_stage_pixels": book["pixels"],
                    "labor_stage_regions": book["regions"]})
        context.need_images(stage, list(revealed))
        data = source_and_target(f"{stage}/labels", sorted(revealed), "annotated")
        spec = context.round_spec(stage, "labor-model", model_steps[k - 1], data, init)
        context.save_round(spec, book, context.write_labels(stage, revealed))
        context.train(spec)
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

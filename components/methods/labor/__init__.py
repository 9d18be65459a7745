"""LabOR: "Labeling Only if Required" (Shin et al., ICCV 2021): the method, in one package.

Unsupervised adaptation stays well below supervised training; LabOR closes most of the gap by
asking a human for labels on the few target pixels the model is unsure about. Per stage (3 in the
paper, human in the loop):

1. Pixel selector B: a copy of the adapted model A's feature extractor with *two* copies of its
   classifier (`TwoHeadSegmenter`). B learns from A's pseudo-labels (cross-entropy, both heads),
   and, as in MCD (Saito et al., CVPR 2018), the heads are trained to *maximise* their discrepancy
   (`head_discrepancy`, L1 between the softmax maps) while the feature extractor *minimises* it.
   Where the heads still disagree, the features are ambiguous: that is where labels help.
2. Inconsistency mask M: the pixels where the two heads' argmax differ (`inconsistency_mask`).
3. Labelling, by an `Annotator` (the `OracleAnnotator` in experiments, a person in production):
   - SPL, segment-based: every pixel of M (about 2.2 % of the pixels in the paper, all stages
     together); `segment_based_selection` also caps it at a label budget, most uncertain pixels
     first, and `spl_stage_share` spreads 2.2 % of each image over the stages.
   - PPL, point-based: 40 points per image in the paper, all stages together here
     (`points_per_stage`: 14 + 13 + 13 over 3 stages). The paper picks, per class
     k, a prototype (the mean probability vector of the uncertain pixels predicted as k) and
     labels the pixels whose probabilities are closest to it (`prototype_point_selection`);
     `point_based_selection` is a spatial variant: one point per connected inconsistent region,
     where the heads disagree most.
4. A is trained on source + the revealed target pixels (cross-entropy), AdaptSegNet's output-space
   adversarial loss kept (`AnnotatedTargetTraining`); before stage 1 it is adapted with that loss
   alone (the `adapt` round, `rounds.warmup`), so the first selection starts from a UDA model as in the
   paper.

Sign convention of the discrepancy for the training step (d = `head_discrepancy(p_a, p_b)` >= 0,
on target images, p_* the softmax maps of the two heads):
  - heads step (feature extractor frozen or detached features):  loss = CE(pseudo) - lambda * d
    i.e. the heads *maximise* d while still fitting the pseudo-labels;
  - feature step (heads frozen):                                  loss = + d
    i.e. the feature extractor *minimises* d.
The L1 gradient is sign(p_a - p_b): two identical heads get no gradient at all, hence the small
perturbation of the second head in `TwoHeadSegmenter`.

Checked against the paper's description (the authors' summary in the awesome-reviews review of
the ICCV 2021 paper: Eq. 4 inconsistency mask, Loss 5 pseudo-label loss, Loss 6 classifier
discrepancy from MCD; PPL = per-class prototype of the uncertain pixels, nearest pixels labelled).
The paper's code is not public.

Layout: `step.py` (the two training steps, the selector network, the inconsistency mask and the
SPL / PPL selections), `annotators.py` (who labels: oracle or a person via files), `rounds.py`
(the labelling stages between training rounds).
"""
from segshift.components.methods.base import MethodSpec
from segshift.components.methods.labor import rounds as _rounds
from segshift.components.methods.labor.annotators import (AnnotationsPending, Annotator, AnswerError,
                                                          FileAnnotator, LazyLabels, OracleAnnotator,
                                                          build_annotator)
from segshift.components.methods.labor.step import (AUX_ATTRIBUTES, HEAD_ATTRIBUTES, REFERENCE_PPL_POINTS,
                                                    REFERENCE_SPL_SHARE, REFERENCE_STAGES,
                                                    AnnotatedTargetTraining, PixelSelectorTraining,
                                                    TwoHeadOutput, TwoHeadSegmenter, build_model_a,
                                                    build_selector, check_label_budget, connected_regions,
                                                    find_head_attribute, head_discrepancy, inconsistency_mask,
                                                    pixel_discrepancy, point_based_selection, points_per_stage,
                                                    prototype_point_selection, segment_based_selection,
                                                    spl_stage_share)

METHOD = MethodSpec("labor", None, steps={"labor-selector": build_selector, "labor-model": build_model_a},
                    rounds=_rounds.rounds, bench=(("labor_selector", "labor-selector", "source"),))

__all__ = ["METHOD", "AUX_ATTRIBUTES", "HEAD_ATTRIBUTES", "REFERENCE_PPL_POINTS", "REFERENCE_SPL_SHARE",
           "REFERENCE_STAGES", "AnnotatedTargetTraining", "AnnotationsPending", "Annotator", "AnswerError",
           "FileAnnotator", "LazyLabels", "OracleAnnotator", "PixelSelectorTraining", "TwoHeadOutput",
           "TwoHeadSegmenter", "build_annotator", "build_model_a", "build_selector", "check_label_budget",
           "connected_regions", "find_head_attribute", "head_discrepancy", "inconsistency_mask",
           "pixel_discrepancy", "point_based_selection", "points_per_stage", "prototype_point_selection",
           "segment_based_selection", "spl_stage_share"]

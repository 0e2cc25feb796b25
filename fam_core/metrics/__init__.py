"""Evaluation metrics for explanations, batched on tensors (one module per family).

- :mod:`~fam_core.metrics.localisation`: energy pointing game (FAM eq. 19), box IoU (eq. 20),
  pointing game, mask IoU curve and its area (An8Flower);
- :mod:`~fam_core.metrics.faithfulness`: Average Drop / Increase in Confidence (eq. 21-22),
  deletion / insertion AUC, the explanation-map AP (Grad-FAM / Score-FAM, appendix A);
- :mod:`~fam_core.metrics.sanity`: cascading model-parameter randomisation (Adebayo et al.);
- :mod:`~fam_core.metrics.scoring`: the scores the faithfulness metrics read;
- :mod:`~fam_core.metrics.relevance`: feature ablation and class reconstruction (Oramas et al.);
- :mod:`~fam_core.metrics.target`: target sensitivity on multi-object scenes (which object
  made the match).
"""

from fam_core.metrics.faithfulness import (
    average_drop,
    curve_auc,
    deletion_curve,
    explanation_map_average_precision,
    explanation_map_images,
    increase_in_confidence,
    insertion_curve,
    masked_by_map,
    masked_model_input,
)
from fam_core.metrics.localisation import (
    area_under_iou_curve,
    box_iou,
    boxes_to_masks,
    connected_components,
    energy_pointing_proportion,
    estimated_boxes,
    mask_iou_curve,
    pointing_game,
)
from fam_core.metrics.sanity import RandomisationResult, cascading_randomisation, spearman
from fam_core.metrics.scoring import class_probability_scorer, similarity_scorer
from fam_core.metrics.target import (
    matched_and_others,
    part_hits,
    part_shares,
    target_sensitivity,
)

__all__ = [
    "RandomisationResult",
    "area_under_iou_curve",
    "average_drop",
    "box_iou",
    "boxes_to_masks",
    "cascading_randomisation",
    "class_probability_scorer",
    "connected_components",
    "curve_auc",
    "deletion_curve",
    "energy_pointing_proportion",
    "estimated_boxes",
    "explanation_map_average_precision",
    "explanation_map_images",
    "increase_in_confidence",
    "insertion_curve",
    "mask_iou_curve",
    "matched_and_others",
    "masked_by_map",
    "masked_model_input",
    "part_hits",
    "part_shares",
    "pointing_game",
    "similarity_scorer",
    "spearman",
    "target_sensitivity",
]

"""Tasks that use embedding models: few-shot episodes, kNN memory banks, retrieval.

Each task also says what FAM-family explainers should explain a query against: the class
prototype (few-shot), the nearest neighbours of the predicted class (kNN), the top-1 gallery
item (retrieval).
"""

from fam_core.tasks.fewshot import (
    EpisodePredictions,
    EpisodeResult,
    classify_episode,
    few_shot_accuracy,
    prototype_targets,
    sample_episodes,
)
from fam_core.tasks.knn import KnnPrediction, knn_accuracy, knn_predict, neighbour_targets
from fam_core.tasks.retrieval import (
    RetrievalResult,
    average_precision,
    recall_at_k,
    retrieval_metrics,
    top1_gallery_targets,
)

__all__ = [
    "EpisodePredictions",
    "EpisodeResult",
    "KnnPrediction",
    "RetrievalResult",
    "average_precision",
    "classify_episode",
    "few_shot_accuracy",
    "knn_accuracy",
    "knn_predict",
    "neighbour_targets",
    "prototype_targets",
    "recall_at_k",
    "retrieval_metrics",
    "sample_episodes",
    "top1_gallery_targets",
]

"""Tasks that use embedding models: few-shot episodes."""

from fam_core.tasks.fewshot import EpisodeResult, few_shot_accuracy, sample_episodes

__all__ = ["EpisodeResult", "few_shot_accuracy", "sample_episodes"]

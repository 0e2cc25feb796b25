"""The evaluation suite behind ``fam eval``: settings, the runner and its report."""

SETTING_NAMES: tuple[str, ...] = (
    "few-shot",
    "kNN",
    "retrieval",
    "scene",
    "scene-retrieval",
    "classifier",
)
"""The settings ``fam eval`` evaluates, in order (:mod:`.settings` and :mod:`.scenes`)."""

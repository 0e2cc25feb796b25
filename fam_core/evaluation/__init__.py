"""The evaluation suite behind ``fam eval``: settings, the runner and its report."""

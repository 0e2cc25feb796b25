"""Relevant features (Oramas, Wang, Tuytelaars, ICLR 2019), the whole machinery in one place.

- :mod:`~fam_core.explainers.relevant.relevant`: the descriptor, the fit and the explainer;
- :mod:`~fam_core.explainers.relevant.mu_lasso`: the mu-Lasso that selects the features;
- :mod:`~fam_core.explainers.relevant.receptive_field`: receptive fields and patch crops;
- :mod:`~fam_core.explainers.relevant.relevant_interpretation`: features interpreted by
  average image patches;
- :mod:`~fam_core.explainers.relevant.relevant_ablation`: the feature-ablation check.

The features are sent back to the input by :mod:`fam_core.explainers.backprop`.
"""

from fam_core.explainers.relevant.mu_lasso import solve_mu_lasso
from fam_core.explainers.relevant.receptive_field import ReceptiveField, receptive_field
from fam_core.explainers.relevant.relevant import RelevantFeatures, features
from fam_core.explainers.relevant.relevant_ablation import AblationReport, ablation_check
from fam_core.explainers.relevant.relevant_interpretation import (
    Interpretation,
    interpret_features,
    render_interpretation,
)

__all__ = [
    "AblationReport",
    "Interpretation",
    "ReceptiveField",
    "RelevantFeatures",
    "ablation_check",
    "features",
    "interpret_features",
    "receptive_field",
    "render_interpretation",
    "solve_mu_lasso",
]

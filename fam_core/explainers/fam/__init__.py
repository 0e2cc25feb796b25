"""The FAM family: the channel weight is the channel's contribution to a similarity.

- :mod:`~fam_core.explainers.fam.fam`: FAM (Liao, Gao, Zhang);
- :mod:`~fam_core.explainers.fam.gradfam` and :mod:`~fam_core.explainers.fam.scorefam`:
  Grad-FAM and Score-FAM (Wu, Chen, Che, Pu);
- :mod:`~fam_core.explainers.fam.variants`: FAM variants aimed at target sensitivity
  (beyond the papers; registered under their own names).
"""

from fam_core.explainers.fam.fam import FAM
from fam_core.explainers.fam.gradfam import GradFAM
from fam_core.explainers.fam.scorefam import ScoreFAM
from fam_core.explainers.fam.variants import CentredFAM, OrthogonalFAM, SignedFAM

__all__ = ["FAM", "CentredFAM", "GradFAM", "OrthogonalFAM", "ScoreFAM", "SignedFAM"]

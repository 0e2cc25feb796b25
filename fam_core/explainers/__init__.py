"""Explainers: one module per method over :class:`~fam_core.explainers.base.Explainer`."""

from fam_core.explainers.base import Explainer
from fam_core.explainers.fam import FAM

__all__ = ["FAM", "Explainer"]

"""Ablation-CAM (Desai & Ramaswamy, 2020), FAM paper section III-C.

y_n = score with activation map A^n set to zero
w_n = (y - y_n) / y                                     eq. 6
L   = ReLU(sum_n w_n A^n)                               eq. 6

Ablated copies are scored ``batch_size`` at a time. When the layers after the target
layer are a global pooling followed by other layers that reproduce the model's output
from the pooled map (checked on every call), only those layers are re-run; otherwise the
whole model runs with a temporary hook that replaces the target layer's output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fam_core.explainers.base import ForwardPass
from fam_core.explainers.cam.cam_common import (
    BatchedExplainer,
    chunks,
    rectified_sum,
    select_references,
)
from fam_core.explainers.registry import register
from fam_core.explainers.targets import ResolvedTarget

_EPS = 1e-12


@register
class AblationCAM(BatchedExplainer):
    """Ablation-CAM: each channel is weighted by the relative score drop without it.

    Args:
        model, target_layer, similarity, pooling, head, nonlinear_head, classifier: as
            :class:`~fam_core.explainers.base.Explainer`.
        batch_size: ablated copies per forward pass.

    Example:
        >>> from fam_core.models.backbones import conv4
        >>> model = conv4(num_classes=5, width=0.25).eval()
        >>> AblationCAM(model, "block4")(torch.rand(2, 3, 84, 84), 1).extras["score_drop"].shape
        torch.Size([2, 16])
    """

    method = "ablationcam"

    @torch.no_grad()
    def channel_weights(
        self, forward: ForwardPass, target: ResolvedTarget, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        run_head = self._head_if_exact(forward, images)

        def ablated_scores(
            activations: torch.Tensor, rows: torch.Tensor, dropped: torch.Tensor
        ) -> torch.Tensor:
            parts = []
            for part in chunks(rows.shape[0], self.batch_size):
                ablated = activations[rows[part]].clone()
                ablated[torch.arange(ablated.shape[0]), dropped[part]] = 0  # A^n := 0
                outputs = (
                    run_head(ablated) if run_head else self.run_with(images[rows[part]], ablated)
                )
                parts.append(self.score(outputs, select_references(target, rows[part])))  # y_n
            return torch.cat(parts)

        scores, ablated = self.channel_scores(forward, target, ablated_scores)  # y, y_n
        drop = scores.unsqueeze(1) - ablated  # y - y_n
        safe = torch.where(scores >= 0, 1.0, -1.0) * scores.abs().clamp_min(_EPS)
        return drop / safe.unsqueeze(1), scores, {"score_drop": drop}  # eq. 6

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return rectified_sum(weights, activations)  # eq. 6

    def _head_if_exact(
        self, forward: ForwardPass, images: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The layers after the target layer as a function, if they reproduce the output."""
        try:
            head = self.head_for(forward, images)
            if head.kind == "jacobian":
                return None
            predicted = self._as_vectors(head.transform(head.pool(forward.activations.detach())))
        except (ValueError, RuntimeError, TypeError):
            return None
        outputs = forward.outputs.detach()
        if predicted.shape != outputs.shape or not torch.allclose(
            predicted, outputs, rtol=1e-4, atol=1e-5
        ):
            return None
        return lambda ablated: self._as_vectors(head.transform(head.pool(ablated)))

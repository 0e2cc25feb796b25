"""The explanation maths, once: pure tensor functions the explainers and the ONNX heads share.

FAM (Liao et al., section IV), Grad-FAM and the CAM family combine the target layer's maps
``A`` ``[B, N, h, w]`` with channel weights. The steps below are written here only:
:mod:`fam_core.explainers` call them in torch, and :mod:`fam_core.exporters.heads` calls the same
functions in the graphs it traces into ONNX, so an exported file runs the library's code.

s_k   = s(Z', R_k)                        eq. 14           :func:`fam_embedding_weights`
c'_k  = contribution of each channel / |s_k|  eq. 15
C'    = mean_k c'_k (or the best k)        eq. 11
C     = W x C'^T                           eq. 16-18        :func:`to_channels`
L     = sum_n w_n A^n                      eq. 13           :func:`weighted_sum`
L     = ReLU(sum_n w_n A^n)                Grad-CAM eq. 2   :func:`rectified_sum`

Every function is shape-polymorphic in the batch and traceable (TorchScript, ``make_fx``,
``torch.export``): no data-dependent Python branches.

Example:
    >>> activations = torch.rand(2, 4, 3, 3)
    >>> outputs = activations.mean(dim=(2, 3))
    >>> contributions = channel_contributions(outputs, torch.rand(2, 5, 4), "cosine")
    >>> scores, embedding_weights = fam_embedding_weights(contributions)
    >>> raw = weighted_sum(to_channels(embedding_weights, None), activations)
    >>> scores.shape, raw.shape
    (torch.Size([2, 5]), torch.Size([2, 3, 3]))
"""

from __future__ import annotations

from typing import Literal

import torch

from fam_core.maths.similarity import SimilarityKind, channel_contributions, similarity_gradient

__all__ = [
    "EXPLAIN_MODES",
    "ExplainMode",
    "channel_contributions",
    "fam_embedding_weights",
    "gradient_contributions",
    "one_hot_references",
    "rectified_sum",
    "to_channels",
    "weighted_sum",
]

ExplainMode = Literal["mean", "best"]
EXPLAIN_MODES: tuple[str, ...] = ("mean", "best")
_EPS = 1e-12


def fam_embedding_weights(
    contributions: torch.Tensor,
    explain: ExplainMode = "mean",
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAM's weights on the embedding (eq. 14-15, 11): ``(scores [B, K], weights [B, D])``.

    ``contributions`` ``[B, K, D]`` are each embedding channel's share of ``s(Z', R_k)``
    (:func:`fam_core.maths.similarity.channel_contributions`); their sum over ``D`` is the pair's
    score. Each pair's contributions are divided by ``|s_k|`` (eq. 15) and averaged over the
    references (eq. 11), or, with ``explain="best"``, only the best-scoring one is kept.
    ``scores`` ``[B, K]`` gives the pairs' similarities when the contributions do not sum
    to them (a FAM variant's contributions, :mod:`fam_core.explainers.fam.variants`).

    Example:
        >>> contributions = torch.tensor([[[1.0, 1.0], [3.0, -1.0]]])
        >>> fam_embedding_weights(contributions)
        (tensor([[2., 2.]]), tensor([[1., 0.]]))
        >>> fam_embedding_weights(torch.tensor([[[1.0, 1.0], [3.0, 1.0]]]), "best")[1]
        tensor([[0.7500, 0.2500]])
    """
    if explain not in EXPLAIN_MODES:
        raise ValueError(f"explain must be one of {EXPLAIN_MODES}, got {explain!r}")
    if scores is None:
        scores = contributions.sum(dim=2)  # s(Z', R_k), [B, K]
    per_pair = contributions / scores.abs().clamp_min(_EPS).unsqueeze(2)  # eq. 15
    if explain == "mean":
        return scores, per_pair.mean(dim=1)  # eq. 11
    best = scores.argmax(dim=1, keepdim=True).unsqueeze(2)  # [B, 1, 1]
    index = best.expand(-1, -1, per_pair.shape[2])
    return scores, per_pair.gather(1, index).squeeze(1)


def gradient_contributions(
    embeddings: torch.Tensor, references: torch.Tensor, kind: SimilarityKind = "cosine"
) -> torch.Tensor:
    """``z_n * d s(Z, R_k) / d z_n`` ``[B, K, D]``: activation times the similarity's gradient.

    For the cosine this is ``z_n r⊥_kn / (|Z| |R_k|)`` with ``r⊥_k = R_k - (R_k . Ẑ) Ẑ``, the
    reference's part orthogonal to the query embedding (the contributions sum to 0); for
    the dot product it equals :func:`channel_contributions`.

    Example:
        >>> z, r = torch.tensor([[3.0, 4.0]]), torch.tensor([[[4.0, 3.0]]])
        >>> gradient_contributions(z, r, "cosine")  # (4, 3) - 0.96 (3, 4) = (1.12, -0.84)
        tensor([[[ 0.1344, -0.1344]]])
    """
    batch, count, dim = references.shape
    z = embeddings.repeat_interleave(count, dim=0)  # row b * K + k
    gradient = similarity_gradient(z, references.reshape(batch * count, 1, dim), kind)
    return (z * gradient).view(batch, count, dim)


def to_channels(embedding_weights: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """``C = W x C'^T`` (eq. 18): weights on the outputs ``[B, J]`` to channels ``[B, N]``.

    ``matrix`` is the head's linear map ``W`` ``[J, N]``; ``None`` is the identity.

    Example:
        >>> to_channels(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        tensor([[1., 2., 3.]])
    """
    if matrix is None:
        return embedding_weights
    return embedding_weights @ matrix.to(embedding_weights)


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``L = sum_n w_n A^n`` (eq. 13): ``[B, N]`` weights of ``[B, N, h, w]`` maps, ``[B, h, w]``.

    One batched matmul (a plain ``MatMul`` in ONNX).

    Example:
        >>> weighted_sum(torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, 2, 2))
        tensor([[[0., 0.],
                 [0., 0.]]])
    """
    flat = activations.flatten(2)  # [B, N, hw]
    raw = torch.matmul(weights.unsqueeze(1).to(flat.dtype), flat).squeeze(1)  # [B, hw]
    return raw.reshape(raw.shape[0], activations.shape[2], activations.shape[3])


def rectified_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_n a_n A^n)`` (FAM paper eq. 2), ``[B, h, w]``.

    Example:
        >>> rectified_sum(torch.tensor([[1.0, -2.0]]), torch.ones(1, 2, 1, 2))
        tensor([[[0., 0.]]])
    """
    return torch.relu(weighted_sum(weights, activations))


def one_hot_references(
    classes: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Class indices ``[B]`` as one-hot references ``[B, 1, C]``: scored by the dot product,
    the explained score of class ``c`` is the logit ``y_c``. Indices are not checked here
    (the explainers check them; a traced graph cannot branch on data).

    Example:
        >>> one_hot_references(torch.tensor([2, 0]), 3)
        tensor([[[0., 0., 1.]],
        <BLANKLINE>
                [[1., 0., 0.]]])
    """
    positions = torch.arange(num_classes, device=classes.device)
    return (classes.reshape(-1, 1) == positions).to(dtype).unsqueeze(1)

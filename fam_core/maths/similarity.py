"""Similarity scores and their exact per-channel decompositions.

FAM (Liao et al., section IV-C) needs, for a similarity ``s(Z, R)`` between an embedding
``Z`` and a reference ``R`` of ``D`` channels, contributions ``c_n`` with
``sum_n c_n = s(Z, R)``. Each supported similarity has one:

- ``cosine`` (eq. 14): ``s = sum_n z_n r_n / (|Z| |R|)``, so ``c_n = z_n r_n / (|Z| |R|)``.
- ``dot``: ``s = sum_n z_n r_n``, so ``c_n = z_n r_n``.
- ``euclidean``: the similarity is the negative distance ``s = -|Z - R|``. Since
  ``|Z - R| = sum_n (z_n - r_n)^2 / |Z - R|``, ``c_n = -(z_n - r_n)^2 / |Z - R|``
  (and ``c_n = 0`` when ``Z = R``). A channel that differs more contributes more
  dissimilarity.
"""

from __future__ import annotations

from typing import Literal

import torch

SimilarityKind = Literal["cosine", "dot", "euclidean"]
SIMILARITIES: tuple[str, ...] = ("cosine", "dot", "euclidean")

_EPS = 1e-12


def _check(embeddings: torch.Tensor, references: torch.Tensor, kind: str) -> None:
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity {kind!r}; expected one of {SIMILARITIES}")
    if embeddings.dim() != 2 or references.dim() != 3:
        raise ValueError(
            "expected embeddings [B, D] and references [B, K, D], got "
            f"{tuple(embeddings.shape)} and {tuple(references.shape)}"
        )
    if references.shape[0] != embeddings.shape[0] or references.shape[2] != embeddings.shape[1]:
        raise ValueError(
            f"references {tuple(references.shape)} do not match embeddings "
            f"{tuple(embeddings.shape)}: expected [B, K, D] with the same B and D"
        )


def channel_contributions(
    embeddings: torch.Tensor, references: torch.Tensor, kind: SimilarityKind = "cosine"
) -> torch.Tensor:
    """Per-channel contributions ``[B, K, D]`` whose sum over ``D`` is :func:`similarity`.

    Example:
        >>> z, r = torch.tensor([[3.0, 4.0]]), torch.tensor([[[4.0, 3.0]]])
        >>> channel_contributions(z, r, "cosine")
        tensor([[[0.4800, 0.4800]]])
    """
    _check(embeddings, references, kind)
    z = embeddings.unsqueeze(1)  # [B, 1, D]
    if kind == "cosine":
        norms = z.norm(dim=2, keepdim=True) * references.norm(dim=2, keepdim=True)
        return z * references / norms.clamp_min(_EPS)
    if kind == "dot":
        return z * references
    squared = (z - references).square()
    distance = squared.sum(dim=2, keepdim=True).sqrt()
    return -squared / distance.clamp_min(_EPS)


def similarity(
    embeddings: torch.Tensor, references: torch.Tensor, kind: SimilarityKind = "cosine"
) -> torch.Tensor:
    """Similarity ``[B, K]`` of each embedding ``[B, D]`` to its references ``[B, K, D]``.

    Example:
        >>> similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 2.0]]]), "euclidean")
        tensor([[-2.2361]])
    """
    _check(embeddings, references, kind)
    z = embeddings.unsqueeze(1)
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(z, references, dim=2, eps=_EPS)
    if kind == "dot":
        return (z * references).sum(dim=2)
    return -(z - references).norm(dim=2)


def similarity_gradient(
    embeddings: torch.Tensor, references: torch.Tensor, kind: SimilarityKind = "cosine"
) -> torch.Tensor:
    """``d/dZ mean_k s(Z, R_k)`` ``[B, D]`` in closed form (plain operators: ONNX-exportable).

    - cosine: ``r / (|z| |r|) - s z / |z|^2``
    - dot: ``r``
    - euclidean (``s = -|z - r|``): ``-(z - r) / |z - r|`` (0 where ``z = r``)

    ``references`` is ``[B, K, D]`` (or ``[1, K, D]``, broadcast over the batch).

    Example:
        >>> z, r = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 2.0]]])
        >>> similarity_gradient(z, r, "cosine")
        tensor([[0., 1.]])
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity {kind!r}; expected one of {SIMILARITIES}")
    z = embeddings.unsqueeze(1)  # [B, 1, D]
    if kind == "dot":
        per_reference = references
    elif kind == "cosine":
        z_norm = z.norm(dim=2, keepdim=True).clamp_min(_EPS)
        r_norm = references.norm(dim=2, keepdim=True).clamp_min(_EPS)
        cosine = (z * references).sum(dim=2, keepdim=True) / (z_norm * r_norm)
        per_reference = references / (z_norm * r_norm) - cosine * z / z_norm.square()
    else:
        difference = z - references
        distance = difference.norm(dim=2, keepdim=True)
        per_reference = torch.where(distance > 0, -difference / distance.clamp_min(_EPS), 0.0)
    return per_reference.mean(dim=1)  # eq. 11: S is the mean over the K references

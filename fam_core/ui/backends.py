"""Where the viewer's answers come from: the model in-process, or a running ``fam.v1`` server.

Both backends take and return the request pipeline's own types
(:class:`~fam_core.pipeline.ExplainRequest`, :class:`~fam_core.pipeline.ExplainResponse`): the
viewer computes nothing itself, it shows what the pipeline answers.

Example:
    >>> from fam_core.data.flowers import make_flowers
    >>> from fam_core.pipeline import EncodedImage
    >>> from fam_core.render import to_png_bytes
    >>> flower = make_flowers([9], per_class=1).images[0]
    >>> image = EncodedImage(to_png_bytes((flower * 255).round().byte().permute(1, 2, 0)))
    >>> backend = LocalBackend.load("default-classifier")
    >>> backend.describe().task, backend.pixels((image,)).shape
    ('classifier', torch.Size([1, 3, 84, 84]))
    >>> backend.close()
"""

from __future__ import annotations

from typing import Protocol

import torch

from fam_core.images.resize import fit_image
from fam_core.pipeline import (
    ExplainRequest,
    ExplainResponse,
    Limits,
    ModelDescription,
    ModelRegistry,
    Pipeline,
    ServedModel,
)
from fam_core.pipeline.decode import check_sizes, decode_input
from fam_core.pipeline.request import ImageInput, SearchRequest, SearchResponse


class ViewerBackend(Protocol):
    """What the viewer asks of a model."""

    @property
    def model(self) -> str: ...

    @property
    def max_request_bytes(self) -> int: ...

    def describe(self) -> ModelDescription: ...

    def explain(self, request: ExplainRequest) -> ExplainResponse: ...

    def search(self, request: SearchRequest) -> SearchResponse:
        """Embedding models with an ``index``: the explained search of the pipeline."""
        ...

    def pixels(self, images: tuple[ImageInput, ...]) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]``: the images as the model sees them (what its
        input-resolution heatmaps cover)."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The model run in this process through :class:`~fam_core.pipeline.Pipeline`."""

    def __init__(self, served: ServedModel, limits: Limits | None = None) -> None:
        self.pipeline = Pipeline(ModelRegistry([served]), limits or Limits(), batching=None)
        self.model = served.name
        self.max_request_bytes = self.pipeline.limits.max_request_bytes

    @classmethod
    def load(cls, name_or_path: str, *, limits: Limits | None = None) -> LocalBackend:
        """A model by name, config path or ``.onnx`` path (as ``fam explain --model`` takes)."""
        return cls(ServedModel.load(name_or_path), limits)

    def describe(self) -> ModelDescription:
        return self.pipeline.describe(self.model)

    def explain(self, request: ExplainRequest) -> ExplainResponse:
        return self.pipeline.explain(request)

    def search(self, request: SearchRequest) -> SearchResponse:
        return self.pipeline.search(request)

    def pixels(self, images: tuple[ImageInput, ...]) -> torch.Tensor:
        return self.pipeline.pixels(self.model, images)

    def close(self) -> None:
        self.pipeline.close()


class RemoteBackend:
    """Model ``model`` of the ``fam.v1`` server at ``address`` (``HOST:PORT``)."""

    def __init__(self, address: str, model: str, *, token: str | None = None) -> None:
        from fam_core.server.client import FamClient

        self.client = FamClient(address, token=token)
        self.model = model
        self._description = self.client.describe(model)
        self.max_request_bytes = self.client.max_request_bytes(model)
        self._limits = Limits(max_request_bytes=self.max_request_bytes)

    def describe(self) -> ModelDescription:
        return self._description

    def explain(self, request: ExplainRequest) -> ExplainResponse:
        return self.client.explain(request)

    def search(self, request: SearchRequest) -> SearchResponse:
        return self.client.search(request)

    def pixels(self, images: tuple[ImageInput, ...]) -> torch.Tensor:
        """Decoded here within the limits and fitted as the server's ``ModelInfo`` says
        (its input shape, ``resize`` policy and letterbox colour, the ``mean``)."""
        check_sizes(images, self._limits)
        described = self._description
        fitted = [
            fit_image(
                decode_input(image, self._limits, index=i, size=described.input_shape),
                described.input_shape,
                described.resize,  # type: ignore[arg-type]
                fill=described.mean,
            )
            for i, image in enumerate(images)
        ]
        return torch.stack(fitted)

    def close(self) -> None:
        self.client.close()

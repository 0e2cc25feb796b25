"""Run an exported explanation graph (see :mod:`fam_core.exporters`) with onnxruntime.

The file configures the runner: method, target layer, preprocessing and the graph's inputs
come from its metadata props (:mod:`fam_core.graphs.onnx_format`). Providers are CUDA then CPU,
whichever the installed onnxruntime offers (``onnxruntime-gpu`` for CUDA). The result is the
same :class:`~fam_core.explanation.Explanation` the torch explainers return, as CPU tensors
(onnxruntime hands outputs back in host memory).

Example:
    >>> import tempfile
    >>> from fam_core.exporters import export_model
    >>> from fam_core import load_model
    >>> model, config = load_model("default-embedding")
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = export_model(model, config, path=f"{folder.name}/conv4_fam.onnx")
    >>> runner = OnnxExplainer(path)
    >>> explanation = runner(torch.rand(2, 3, 84, 84), references=torch.rand(5, 64))
    >>> explanation.maps.shape
    torch.Size([2, 84, 84])
    >>> folder.cleanup()
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fam_core.explainers.postprocess import min_max
from fam_core.explanation import RESOLUTIONS, Explanation, Resolution
from fam_core.extras import require
from fam_core.graphs import onnx_format as fmt
from fam_core.images.read import to_channels
from fam_core.images.resize import DEFAULT_POLICY, ResizePolicy, check_policy, fit_image

if TYPE_CHECKING:
    from fam_core.exporters.graft_plan import GraftPlan

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_REQUIRED_OUTPUTS = (fmt.OUTPUT_HEATMAP, fmt.OUTPUT_HEATMAP_LOWRES, fmt.OUTPUT_WEIGHTS)

ArrayLike = torch.Tensor | np.ndarray


def default_providers() -> list[str]:
    """CUDA then CPU, keeping those the installed onnxruntime has."""
    onnxruntime = require("onnx", "onnxruntime")

    available = set(onnxruntime.get_available_providers())
    return [name for name in PREFERRED_PROVIDERS if name in available]


def plan_graft(path: str | Path, graft: Mapping[str, Any]) -> GraftPlan:
    """The analysis of the plain ONNX file ``path`` that grafting it with the options
    ``graft`` of :class:`OnnxExplainer` starts with
    (:func:`fam_core.exporters.graft_plan.plan_graft`): its ``cam_refusal()`` says whether
    CAM reads the head, and ``OnnxExplainer(path, graft={**graft, "plan": plan})`` grafts
    without analysing the graph again."""
    from fam_core.exporters.graft_plan import plan_graft as plan

    return plan(Path(path), **graft)


class OnnxExplainer:
    """An exported model + explanation head, run by onnxruntime.

    Args:
        path: the ``.onnx`` file written by :func:`fam_core.exporters.export_model`.
        providers: onnxruntime execution providers (default: :func:`default_providers`).

    A plain ONNX file that fam-core did not write (no metadata) is grafted in memory at load
    time when ``graft`` gives the options of :func:`fam_core.exporters.graft.graft_onnx` (``method``,
    ``target_tensor``, ``output_name``, ``input_size``, ...); ``grafted`` says so. A file
    that :func:`fam_core.exporters.export_model` wrote runs as it is, and ``graft`` is ignored.

    Attributes read from the file: ``method``, ``target_layer``, ``input_size`` ``(H, W)``,
    ``channels`` (the preprocessing metadata's, else the image input's: 1 for a greyscale
    graph), ``mean``, ``std``, ``class_names``,
    ``metadata`` (all props), ``input_names``.

    A call with ``resolution="feature"`` runs the graph without its input-size branch (the
    upsampling and the min-max over the full map): a second session on the same graph less
    the ``heatmap`` output and the nodes only it reads, made on the first such call and kept
    (onnxruntime runs every node of a session whatever outputs a run asks for, so one
    session cannot skip them). It holds a second copy of the graph's weights; a graph
    grafted in memory is grafted again for it (the same options, the same graph).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        graft: Mapping[str, Any] | None = None,
    ) -> None:
        onnxruntime = require("onnx", "onnxruntime")  # or onnxruntime-gpu: the onnx-gpu extra
        path = Path(path)
        if not path.is_file():
            raise OSError(f"no such ONNX file: {path}")
        self.path = path
        providers = list(providers or default_providers())
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.grafted = False
        self._graft_options: dict[str, Any] | None = None  # grafted in memory with these
        self._feature_session: Any = None
        self._feature_lock = threading.Lock()
        if not fmt.is_explanation_graph(self.metadata):
            if graft is None:
                raise ValueError(
                    f"{path} is not a fam-core explanation graph (its metadata lacks "
                    f"{fmt.KEY_METHOD!r} / {fmt.KEY_PREPROCESSING!r}): pass graft={{'method': "
                    "...}} (a config's method / target_tensor) to graft an explanation head "
                    "onto it"
                )
            from fam_core.exporters.graft import graft_onnx

            grafted = graft_onnx(path, **graft)
            self.session = onnxruntime.InferenceSession(
                grafted.SerializeToString(),  # type: ignore[union-attr]
                providers=providers,
            )
            self._graft_options = {key: v for key, v in graft.items() if key != "out_path"}
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
            self.grafted = True
        self.method = self.metadata[fmt.KEY_METHOD]
        self.target_layer = self.metadata[fmt.KEY_TARGET_LAYER]
        preprocessing = json.loads(self.metadata[fmt.KEY_PREPROCESSING])
        self.input_size: tuple[int, int] = tuple(preprocessing["size"])  # type: ignore[assignment]
        self.mean: tuple[float, ...] = tuple(preprocessing["mean"])
        self.std: tuple[float, ...] = tuple(preprocessing["std"])
        self._channels = int(self.session.get_inputs()[0].shape[1])
        self.channels = int(preprocessing.get("channels", self._channels))
        if self._channels != self.channels:
            raise ValueError(
                f"{path}: its image input takes {self._channels} channels, its preprocessing "
                f"metadata says {self.channels}"
            )
        self.resize: ResizePolicy = check_policy(preprocessing.get("resize", DEFAULT_POLICY))
        self.class_names: list[str] = json.loads(self.metadata.get(fmt.KEY_CLASS_NAMES, "[]"))
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_names = [value.name for value in self.session.get_outputs()]
        missing = [name for name in _REQUIRED_OUTPUTS if name not in self.output_names]
        if missing:
            raise ValueError(
                f"{path} has no {', '.join(missing)} output: export it with heatmap=True"
            )
        self._dimension = self._output_width(fmt.OUTPUT_EMBEDDING) or self._output_width(
            fmt.OUTPUT_LOGITS
        )

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses."""
        return self.session.get_providers()

    @property
    def output_dim(self) -> int | None:
        """``D`` of the ``embedding`` or ``C`` of the ``logits`` output."""
        return self._dimension

    @property
    def output_activation(self) -> str | None:
        """``"softmax"``, ``"log_softmax"`` or ``"sigmoid"``: what the grafted graph's source
        applied after the logits it explains (the ``logits`` output holds the logits; scores
        apply the activation back), ``None`` when it applied none."""
        value = self.metadata.get(fmt.KEY_OUTPUT_ACTIVATION)
        return value if value in fmt.OUTPUT_ACTIVATIONS else None

    @property
    def feature_shape(self) -> tuple[int, int] | None:
        """``(h, w)`` of the ``heatmap_lowres`` output (the target layer's maps)."""
        for value in self.session.get_outputs():
            if value.name == fmt.OUTPUT_HEATMAP_LOWRES and all(
                isinstance(extent, int) for extent in value.shape[1:]
            ):
                return (int(value.shape[1]), int(value.shape[2]))
        return None

    @property
    def takes_references(self) -> bool:
        return fmt.INPUT_REFERENCES in self.input_names

    @property
    def takes_class_index(self) -> bool:
        return fmt.INPUT_CLASS_INDEX in self.input_names

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` (or ``[3, h, w]``) images in ``[0, 1]`` fitted to the graph's input
        size by its resize policy (:func:`fam_core.images.resize.fit_image`; ``"crop"`` unless the
        metadata says otherwise), given the channels the graph takes
        (:func:`fam_core.images.read.to_channels`: luminance for a greyscale graph), then
        normalised as the file's metadata says.

        Example:
            >>> runner = object.__new__(OnnxExplainer)  # the attributes a file would give
            >>> runner.input_size, runner.resize = (4, 6), "letterbox"
            >>> runner.mean, runner.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
            >>> runner.channels = 3
            >>> runner.preprocess(torch.ones(1, 3, 8, 8)).shape
            torch.Size([1, 3, 4, 6])
        """
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        fitted = to_channels(
            fit_image(batch, self.input_size, self.resize, fill=self.mean), self.channels
        )
        mean = torch.tensor(self.mean, dtype=fitted.dtype, device=fitted.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=fitted.dtype, device=fitted.device).view(1, -1, 1, 1)
        return (fitted - mean) / std

    def __call__(
        self,
        images: ArrayLike,
        references: ArrayLike | None = None,
        class_index: int | Sequence[int] | ArrayLike | None = None,
        *,
        resolution: Resolution = "input",
    ) -> Explanation:
        """Explain normalised ``images`` ``[B, C, H, W]`` float32 (``C``: :attr:`channels`).

        ``references`` ``[K, D]`` float32 are required by graphs that take them (and refused
        by graphs with baked references); ``class_index`` (int, one per image) by CAM graphs
        exported with a class input. ``resolution="feature"``: ``maps`` are the ``raw`` maps
        min-max normalised at the target layer's resolution, from the graph run without its
        input-size branch (see the class); ``"input"``: the graph's ``heatmap``.
        """
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
        image = self._check_images(images)
        feeds: dict[str, np.ndarray] = {fmt.INPUT_IMAGE: image}
        if self.takes_references:
            if references is None:
                raise ValueError(
                    "this graph explains similarity to references: pass references [K, D] "
                    f"float32 with D = {self._dimension}"
                )
            feeds[fmt.INPUT_REFERENCES] = self._check_references(references)
        elif references is not None:
            raise ValueError("this graph takes no references (they are baked in or it is CAM)")
        if self.takes_class_index:
            if class_index is None:
                raise ValueError("this graph explains a given class: pass class_index")
            feeds[fmt.INPUT_CLASS_INDEX] = self._check_classes(class_index, image.shape[0])
        elif class_index is not None:
            raise ValueError("this graph takes no class_index (it explains the top-1 class)")
        session = self.session if resolution == "input" else self._feature_graph()
        names = [value.name for value in session.get_outputs()]
        values = dict(zip(names, self._run(session, feeds, image.shape[0]), strict=True))
        return self._explanation(values, feeds)

    def _feature_graph(self) -> Any:
        """The session of the graph less its ``heatmap`` output and the nodes only that
        output reads (made on first use)."""
        with self._feature_lock:
            if self._feature_session is None:
                onnxruntime = require("onnx", "onnxruntime")
                onnx = require("onnx", "onnx")
                from fam_core.exporters.onnx_graph import drop_output

                if self._graft_options is not None:
                    from fam_core.exporters.graft import graft_onnx

                    proto = graft_onnx(self.path, **self._graft_options)
                else:
                    proto = onnx.load(str(self.path))
                drop_output(proto, fmt.OUTPUT_HEATMAP)
                self._feature_session = onnxruntime.InferenceSession(
                    proto.SerializeToString(), providers=self.session.get_providers()
                )
            return self._feature_session

    def _run(self, session: Any, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        """One session run; in runs of the graph's own batch where its input fixes one (a
        TFLite file's batch of 1), the per-image feeds split and the outputs joined."""
        fixed = session.get_inputs()[0].shape[0]
        if not isinstance(fixed, int) or fixed <= 0 or fixed == batch:
            return session.run(None, feeds)
        if batch % fixed:
            raise ValueError(f"this graph takes batches of {fixed} images, got {batch}")
        per_image = {fmt.INPUT_IMAGE, fmt.INPUT_CLASS_INDEX}
        runs = [
            session.run(
                None,
                {
                    name: value[start : start + fixed] if name in per_image else value
                    for name, value in feeds.items()
                },
            )
            for start in range(0, batch, fixed)
        ]
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

    # -- helpers
    def _output_width(self, name: str) -> int | None:
        for value in self.session.get_outputs():
            if value.name == name and isinstance(value.shape[1], int):
                return value.shape[1]
        return None

    def _explanation(self, values: dict[str, np.ndarray], feeds: dict[str, Any]) -> Explanation:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in values.items()}
        if fmt.OUTPUT_SCORES in tensors:
            pair_scores = tensors[fmt.OUTPUT_SCORES]
            best = self.metadata.get(fmt.KEY_EXPLAIN) == "best"
            scores = pair_scores.amax(dim=1) if best else pair_scores.mean(dim=1)
            extras = {"embedding": tensors[fmt.OUTPUT_EMBEDDING], "pair_scores": pair_scores}
        else:
            logits = tensors[fmt.OUTPUT_LOGITS]
            classes = (
                torch.from_numpy(feeds[fmt.INPUT_CLASS_INDEX])
                if self.takes_class_index
                else tensors[fmt.OUTPUT_CLASS_INDEX]
            )
            scores = logits.gather(1, classes.view(-1, 1)).squeeze(1)
            extras = {"logits": logits, "class_index": classes}
        if "head" in self.metadata:  # how the head was decomposed, as the torch explainers say
            extras["head"] = self.metadata["head"]
        if fmt.KEY_EXPLAINED_OUTPUT in self.metadata:  # a grafted graph: the value explained
            extras["output"] = self.metadata[fmt.KEY_EXPLAINED_OUTPUT]
        if self.output_activation is not None:
            extras["output_activation"] = self.output_activation
        raw = tensors[fmt.OUTPUT_HEATMAP_LOWRES]
        if fmt.OUTPUT_HEATMAP in tensors:
            maps = tensors[fmt.OUTPUT_HEATMAP]
        else:  # the feature-resolution graph
            maps = min_max(raw.float(), dim=(1, 2))
            extras["resolution"] = "feature"
        return Explanation(
            maps=maps,
            raw=raw,
            weights=tensors[fmt.OUTPUT_WEIGHTS],
            scores=scores,
            method=self.method,
            target_layer=self.target_layer,
            extras=extras,
        )

    def _check_images(self, images: ArrayLike) -> np.ndarray:
        array = _as_float32(images, "images", f"[B, {self._channels}, H, W]")
        height, width = self.input_size
        expected = f"[B, {self._channels}, {height}, {width}]"
        if array.ndim != 4:
            raise ValueError(f"images must be {expected}, got shape {tuple(array.shape)}")
        if array.shape[0] == 0:
            raise ValueError("images is an empty batch: expected at least one image")
        if array.shape[1:] != (self._channels, height, width):
            raise ValueError(
                f"images must be {expected} (the size this graph was exported for), "
                f"got shape {tuple(array.shape)}"
            )
        return array

    def _check_references(self, references: ArrayLike) -> np.ndarray:
        array = _as_float32(references, "references", "[K, D]")
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != self._dimension:
            raise ValueError(
                f"references must be [K, {self._dimension}] with K >= 1, "
                f"got shape {tuple(array.shape)}"
            )
        return array

    def _check_classes(self, classes: object, batch: int) -> np.ndarray:
        if isinstance(classes, bool):
            raise TypeError("class_index must be an int or a sequence of ints, not a bool")
        if isinstance(classes, torch.Tensor):
            classes = classes.detach().cpu().numpy()
        array = np.asarray(classes)
        if array.dtype.kind not in "iu":
            raise TypeError(f"class_index must hold integers, got dtype {array.dtype}")
        array = np.broadcast_to(array.reshape(-1), (batch,)) if array.size == 1 else array
        if array.shape != (batch,):
            raise ValueError(f"got {array.size} class indices for a batch of {batch}")
        if (array < 0).any() or (array >= self._dimension).any():
            raise ValueError(
                f"class index out of range: expected 0 <= class_index < {self._dimension}, "
                f"got {array.tolist()}"
            )
        return np.ascontiguousarray(array, dtype=np.int64)


def _as_float32(values: object, name: str, shape: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 {shape}, got a tensor of {values.dtype}")
        return np.ascontiguousarray(values.detach().cpu().numpy())
    if isinstance(values, np.ndarray):
        if values.dtype != np.float32:
            raise TypeError(f"{name} must be float32 {shape}, got an array of {values.dtype}")
        return np.ascontiguousarray(values)
    raise TypeError(
        f"{name} must be a float32 torch.Tensor or numpy array {shape}, got {type(values).__name__}"
    )

"""The onnxruntime backend: a served model that is an exported graph (see :mod:`fam_core.exporters`).

A graph ``fam export`` wrote computes the prediction and the heatmap of the method baked
into it (its ``method`` metadata); any other method is
:class:`~fam_core.pipeline.errors.NotFound`. The file's metadata configures the model
(target layer, input size, channels, mean, std, class names).
Results are :class:`~fam_core.pipeline.engine.Computed`, encoded by the same code as the
torch path, and mean what they mean there:

- classifiers: softmax scores of the logits; the heatmap explains the predicted class, or
  the request's ``target_class`` (graphs exported with ``class_input=True``);
- embedding models: cosine scores to the prototypes (baked, or the config's ``prototypes``
  fed as ``references``) or to the request's references; the heatmap explains the nearest
  prototype, the mean similarity to the request's references (eq. 11), or, with neither,
  the embedding itself. A ``"mean"`` graph explains the nearest prototype in a second pass
  with that prototype alone (the mean over one reference is that reference).

A request the graph cannot answer this way is :class:`InvalidArgument`, naming the export
option it needs.

A graph ``fam export`` did not write is grafted with an explanation head first, by
``fam_core.exporters.graft.graft_onnx`` (at the config's ``target_tensor``): with the
model's default method at load (:func:`fam_core.explainers.default_method.choose_method`: the config's
``method``, else FAM for embedding models, CAM for classifiers, Grad-CAM where the graft
finds a head CAM cannot read; a file that cannot be grafted does not load), and with
every other method it takes on that method's first request
(:class:`~fam_core.pipeline.onnx_methods.GraftedMethods`); methods it does not take are
:class:`NotFound`, naming why.

Example:
    >>> loaded = load_onnx_backend("conv4_fam.onnx")  # doctest: +SKIP
    >>> loaded.backend.methods, loaded.config.target_layer  # doctest: +SKIP
    (('fam',), 'block4')
    >>> load_onnx_backend("plain.onnx", config).backend.methods  # doctest: +SKIP
    ('cam', 'gradcam')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fam_core.explainers.default_method import MethodChoice, choose_method
from fam_core.explanation import Explanation, Resolution
from fam_core.graphs import onnx_format as fmt
from fam_core.graphs.onnx_runtime import OnnxExplainer, plan_graft
from fam_core.messages import first_line
from fam_core.models.model_check import ModelFacts, check_against_model
from fam_core.models.store import ModelConfig
from fam_core.pipeline.backends import Batch, LoadedBackend, ServedView
from fam_core.pipeline.errors import InvalidArgument, NotFound
from fam_core.pipeline.jobs import Computed, Job, predict
from fam_core.pipeline.onnx_methods import GraftedMethods, graftable_methods


class _Pass(NamedTuple):
    """One graph run, in item order: ``outputs`` (embedding or logits), ``pair_scores``
    ``[b, K]`` (embedding graphs) and the graph's explanation."""

    outputs: torch.Tensor
    pair_scores: torch.Tensor | None
    explanation: Explanation


@dataclass(frozen=True)
class OnnxBackend:
    """Runs an exported graph for :func:`fam_core.pipeline.engine.run_jobs`.

    ``runner`` is the graph of the default method; ``grafts`` (plain files) the graphs of
    the other methods, grafted on first use; ``None``: a ``fam export`` graph, one method.
    ``choice``: why ``runner``'s method is the default (plain files).
    """

    runner: OnnxExplainer
    grafts: GraftedMethods | None = None
    name: str = ""
    choice: MethodChoice | None = None
    resolution: Resolution = "input"  # the heatmaps of the jobs it runs: "feature" skips upsampling

    def __post_init__(self) -> None:
        meta = self.runner.metadata
        if meta.get(fmt.KEY_TASK) == "embedding":
            similarity = meta.get(fmt.KEY_SIMILARITY, "cosine")
            if similarity != "cosine":
                raise ValueError(
                    f"{self.runner.path}: the pipeline reports cosine scores; this graph was "
                    f"exported with similarity {similarity!r}: export it with 'cosine'"
                )
            if self.baked > 1 and self.explain != "best":
                raise ValueError(
                    f"{self.runner.path}: a graph with baked prototypes explains the nearest "
                    "one only when exported with explain='best'"
                )

    @property
    def method(self) -> str:
        return self.runner.method

    @property
    def methods(self) -> tuple[str, ...]:
        """The method baked into the graph, or every method grafted onto a plain file."""
        if self.grafts is None:
            return (self.runner.method,)
        return self.grafts.methods

    @property
    def default_method(self) -> str:
        return self.runner.method

    @property
    def default_choice(self) -> MethodChoice:
        if self.choice is not None:
            return self.choice
        return MethodChoice(self.runner.method, "the one method fam export wrote into the graph")

    def check_method(self, method: str) -> None:
        """:class:`NotFound` unless this graph explains with ``method`` (grafting a plain
        file with it now if this is its first use), naming why not."""
        self.runner_for(method)

    def runner_for(self, method: str) -> OnnxExplainer:
        """The graph that explains with ``method`` (:class:`NotFound` if none does)."""
        try:
            if self.grafts is not None:
                return self.grafts.runner(method)
            if method == self.runner.method:
                return self.runner
            raise NotFound(
                f"method {method!r} is not in this graph: fam export wrote it with "
                f"{self.runner.method!r} only"
            )
        except NotFound as error:
            where = f"model {self.name!r}: " if self.name else ""
            raise NotFound(
                f"{where}{error} (ONNX graph {self.runner.path.name}); expected one of "
                f"{list(self.methods)}"
            ) from None

    @property
    def explain(self) -> str:
        """``"mean"`` over the references, or ``"best"``: the top-scoring one."""
        return self.runner.metadata.get(fmt.KEY_EXPLAIN, "mean")

    @property
    def baked(self) -> int:
        """How many references are baked into the graph (0: it takes them as an input)."""
        if self.runner.metadata.get(fmt.KEY_REFERENCES) != "baked":
            return 0
        return int(self.runner.metadata[fmt.KEY_NUM_REFERENCES])

    def run(self, served: ServedView, batch: Batch) -> Computed:
        """Predict (and explain) ``batch.inputs`` ``[B, C, S, S]`` as the torch engine does,
        with the graph of ``job.method`` (the default one's when it predicts only)."""
        inputs, job, classes, references = batch.inputs, batch.job, batch.classes, batch.references
        runner = self.runner_for(job.method) if job.heatmap else self.runner
        resolution = job.resolution if job.heatmap else self.resolution
        if runner is not self.runner or resolution != self.resolution:
            # the same steps on that method's graph, at the job's resolution
            return replace(self, runner=runner, grafts=None, resolution=resolution).run(
                served, batch
            )
        if served.task == "classifier":
            return self._classify(served, inputs, job, classes)
        return self._embed(served, inputs, job, references)

    # -- classifiers
    def _classify(
        self, served: ServedView, inputs: torch.Tensor, job: Job, classes: list[int | None]
    ) -> Computed:
        given = all(c is not None for c in classes)
        first = self._call(inputs, classes=[0 if c is None else c for c in classes], served=served)
        scores, predicted = predict(served, first.outputs, None)
        if self.runner.output_activation == "sigmoid":  # the graph's own multi-label scores
            scores = torch.sigmoid(first.outputs)
        if not job.heatmap:
            return Computed(outputs=first.outputs, scores=scores, predicted=predicted)
        targets = [p if c is None else c for c, p in zip(classes, predicted.tolist(), strict=True)]
        explained = first
        if self.runner.takes_class_index:
            if not given:  # the classes to explain are known only now
                explained = self._call(inputs, classes=targets, served=served)
        elif targets != predicted.tolist():
            raise InvalidArgument(
                f"model {served.name!r} is an ONNX graph that explains the top-1 class: "
                "export it with class_input=True to explain a given target_class"
            )
        return Computed.explained_by(first.outputs, scores, predicted, explained.explanation)

    # -- embedding models
    def _embed(
        self,
        served: ServedView,
        inputs: torch.Tensor,
        job: Job,
        references: torch.Tensor | None,
    ) -> Computed:
        if references is not None:  # [B, K, D]: explain the mean similarity (eq. 11)
            if self.baked:
                raise InvalidArgument(
                    f"model {served.name!r} is an ONNX graph with baked prototypes: it cannot "
                    "take references; export it without baked references"
                )
            if job.heatmap and self.explain == "best" and references.shape[1] > 1:
                raise InvalidArgument(
                    f"model {served.name!r} is an ONNX graph that explains the best reference "
                    "only: send one reference, or export it with explain='mean'"
                )
            first = self._by_reference(served, inputs, references)
            return self._ranked(first.outputs, first.pair_scores, first if job.heatmap else None)
        if self.baked or served.prototypes is not None:  # explain the nearest prototype
            first = self._call(inputs, references=served.prototypes, served=served)
            scores = first.pair_scores
            if not job.heatmap or self.explain == "best" or scores.shape[1] == 1:
                return self._ranked(first.outputs, scores, first if job.heatmap else None)
            nearest = served.prototypes[scores.argmax(dim=1)].unsqueeze(1)  # type: ignore[index]
            return self._ranked(first.outputs, scores, self._by_reference(served, inputs, nearest))
        # No prototypes: the embedding explains itself. The embedding does not depend on the
        # references input, so any reference serves for the first pass.
        probe = torch.ones(1, int(served.output_dim))
        first = self._call(inputs, references=probe, served=served)
        empty = first.outputs.new_zeros(first.outputs.shape[0], 0)
        if not job.heatmap:
            return self._ranked(first.outputs, empty, None)
        itself = self._by_reference(served, inputs, first.outputs.unsqueeze(1))
        return self._ranked(first.outputs, empty, itself)

    def _ranked(
        self, outputs: torch.Tensor, scores: torch.Tensor | None, explained: _Pass | None
    ) -> Computed:
        assert scores is not None
        if scores.shape[1] == 0:
            predicted = torch.full((outputs.shape[0],), -1, dtype=torch.long)
        else:
            predicted = scores.argmax(dim=1)
        if explained is None:
            return Computed(outputs=outputs, scores=scores, predicted=predicted)
        return Computed.explained_by(outputs, scores, predicted, explained.explanation)

    def _by_reference(
        self, served: ServedView, inputs: torch.Tensor, references: torch.Tensor
    ) -> _Pass:
        """Item ``i`` against ``references[i]`` ``[K, D]``; items with equal ones in one run."""
        groups: list[tuple[list[int], torch.Tensor]] = []
        for index in range(references.shape[0]):
            for members, shared in groups:
                if torch.equal(shared, references[index]):
                    members.append(index)
                    break
            else:
                groups.append(([index], references[index]))
        runs = [
            self._call(inputs[members], references=shared, served=served)
            for members, shared in groups
        ]
        order = torch.tensor([index for members, _ in groups for index in members])
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))  # run order -> item order
        pair_scores = None  # one graph: every run has them, or none does
        if runs[0].pair_scores is not None:
            pair_scores = torch.cat([run.pair_scores for run in runs])[back]  # type: ignore[misc]
        return _Pass(
            outputs=torch.cat([run.outputs for run in runs])[back],
            pair_scores=pair_scores,
            explanation=Explanation.concat([run.explanation for run in runs])[back],
        )

    # -- one graph run
    def _call(
        self,
        inputs: torch.Tensor,
        *,
        served: ServedView,
        references: torch.Tensor | None = None,
        classes: list[int] | None = None,
    ) -> _Pass:
        feeds: dict[str, object] = {}
        if self.runner.takes_references:
            feeds["references"] = references.detach().float().cpu().contiguous()  # type: ignore[union-attr]
        if self.runner.takes_class_index:
            feeds["class_index"] = classes
        try:
            explanation = self.runner(
                inputs.detach().float().cpu().contiguous(),  # type: ignore[arg-type]
                **feeds,  # type: ignore[arg-type]
                resolution=self.resolution,
            )
        except (ValueError, TypeError) as error:
            raise InvalidArgument(f"ONNX model {served.name!r}: {error}") from None
        return _as_pass(explanation)


def _as_pass(explanation: Explanation) -> _Pass:
    extras = explanation.extras
    outputs = extras["embedding"] if "embedding" in extras else extras["logits"]
    return _Pass(outputs=outputs, pair_scores=extras.get("pair_scores"), explanation=explanation)


def graft_options(
    config: ModelConfig | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Options of :func:`fam_core.exporters.graft.graft_onnx` for a plain ONNX file served with
    ``config``: task, input size, mean, std, class names, similarity, name, and the config's
    ``target_tensor`` / ``output`` where it has them; ``overrides`` win. The method is the
    first default tried (:func:`~fam_core.explainers.default_method.choose_method` before the head is
    known: the config's ``method``, else FAM for embedding models and CAM for classifiers).
    ``None`` (no config, no overrides): a plain file is refused rather than grafted with
    guessed options.

    Example:
        >>> graft_options(None, {"method": "gradcam"})
        {'method': 'gradcam'}
    """
    if config is None and overrides is None:
        return None
    options: dict[str, Any] = {}
    if config is not None:
        options = {
            "method": choose_method(config.task, configured=config.method).method,
            "task": config.task,
            "input_size": config.input_size,
            "mean": tuple(config.mean),
            "std": tuple(config.std),
            "class_names": tuple(config.class_names),
            "similarity": config.similarity,
            "model_name": config.name,
        }
        for key in ("target_tensor", "layout"):
            if getattr(config, key, None) is not None:
                options[key] = getattr(config, key)
        output = getattr(config, "output", None)
        if isinstance(output, str):
            options["output_name"] = output
    options.update(overrides or {})
    return options


def load_onnx_backend(path: str | Path, config: ModelConfig | None = None) -> LoadedBackend:
    """The backend of the graph ``path``, grafted first when ``fam export`` did not write it.

    ``config`` (a ``config.yaml`` with an ``onnx`` key) may name the model, its class names
    and its prototypes file; the file's metadata supplies the target layer and preprocessing.
    Without a config the model is named after the file. Errors are one-line ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"onnx: file {path} is missing")
    where = f"model {config.name!r}: " if config is not None else ""
    if fmt.is_explanation_graph(graph_metadata(path)):
        if config is not None and config.target_tensor is not None:
            raise ValueError(
                f"{where}target_tensor: not used with {path.name}: fam export wrote it, its "
                "target layer is fixed in the graph"
            )
        options = None
    elif config is None:
        raise ValueError(
            f"onnx: {path} is not a fam-core explanation graph; serve it from a config.yaml "
            "that names its task, input_size (and target_tensor:)"
        )
    else:
        _check_plain_config(path, config)
        options = graft_options(config)
    try:
        runner, choice = _graft_default(path, config, options)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}onnx: {str(error).splitlines()[0]}") from None
    task = runner.metadata.get(fmt.KEY_TASK)
    if task not in ("embedding", "classifier"):
        raise ValueError(f"{path}: metadata 'task' must be 'embedding' or 'classifier'")
    height, width = runner.input_size
    if config is None:
        config = ModelConfig(
            name=path.stem,
            task=task,  # type: ignore[arg-type]
            onnx=path.name,
            directory=path.parent,
        )
    elif config.task != task:
        raise ValueError(
            f"model {config.name!r}: task: its config says task {config.task!r}, {path} is {task!r}"
        )
    elif config.method is not None and config.method != runner.method:
        raise ValueError(
            f"model {config.name!r}: method: {config.method!r}, but fam export wrote {path.name} "
            f"with {runner.method!r} (export it again, or drop method:)"
        )
    config = replace(
        config,
        channels=runner.channels,
        target_layer=runner.target_layer,
        input_size=int(height) if height == width else (int(height), int(width)),
        resize=runner.resize,
        mean=tuple(runner.mean),
        std=tuple(runner.std),
        class_names=config.class_names or tuple(runner.class_names),
        similarity=runner.metadata.get(fmt.KEY_SIMILARITY, config.similarity),
    )
    grafts = None if options is None else GraftedMethods(path, options, task, runner)
    try:
        backend = OnnxBackend(runner, grafts, name=config.name, choice=choice)
    except ValueError as error:
        raise ValueError(f"model {config.name!r}: onnx: {error}") from None
    output_dim, feature_shape = runner.output_dim, runner.feature_shape
    if output_dim is None or feature_shape is None:
        raise ValueError(f"{path}: its outputs lack fixed embedding/logits or heatmap sizes")
    prototypes = None
    if task == "embedding" and not backend.baked:
        prototypes = config.load_prototypes()
        if prototypes is not None:
            prototypes = prototypes.float()
    facts = ModelFacts(
        what=path.name,
        output_shape=(1, int(output_dim)),
        prototypes_shape=None if prototypes is None else tuple(prototypes.shape),
        prototypes=backend.baked or None,
    )
    check_against_model(config, facts)
    return LoadedBackend(
        config=config,
        backend=backend,
        prototypes=prototypes,
        output_dim=int(output_dim),
        feature_shape=feature_shape,
    )


def _graft_default(
    path: Path, config: ModelConfig | None, options: dict[str, Any] | None
) -> tuple[OnnxExplainer, MethodChoice | None]:
    """The graph of the default method and why: a ``fam export`` graph as written
    (``options`` ``None``); a plain file grafted with ``options``' method (the config's, FAM
    or CAM), and with Grad-CAM where CAM cannot read the classifier's head. The graph is
    analysed once, before any graft: a head CAM cannot read is known from that analysis, and
    the file is grafted once, with Grad-CAM (and with it again only where a CAM graft fails
    for a reason the analysis could not see)."""
    if options is None or config is None:
        return OnnxExplainer(path, graft=options), None
    choice = choose_method(config.task, configured=config.method)
    plan = plan_graft(path, options)
    options = {**options, "plan": plan}
    fallback = choice.method == "cam" and config.method is None
    refusal = plan.cam_refusal() if fallback else None
    if refusal is None:
        try:
            return OnnxExplainer(path, graft=options), choice
        except ValueError as error:
            if not fallback:
                raise
            refusal = first_line(error)
    choice = choose_method(config.task, cam_refusal=refusal)
    return OnnxExplainer(path, graft={**options, "method": choice.method}), choice


def graph_metadata(path: Path) -> dict[str, str]:
    """The metadata props of the ONNX file ``path`` (its weights are not read)."""
    return {prop.key: prop.value for prop in _read_graph(path).metadata_props}


def _read_graph(path: Path) -> Any:
    """The ``onnx.ModelProto`` of ``path`` (its weights may stay outside)."""
    from fam_core.extras import require

    onnx = require("onnx", "onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one config error
        text = str(error).strip().splitlines()
        raise ValueError(
            f"onnx: cannot read {path}: {text[0] if text else type(error).__name__}"
        ) from None


def graph_facts(path: Path) -> ModelFacts:
    """What a plain graph's file says before it is grafted: the channels of its image input
    ``[B, C, H, W]`` (3 where it is not fixed: the graft says what is wrong with the input)
    and its outputs' names."""
    proto = _read_graph(path)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else ()
    fixed = len(dims) == 4 and dims[1].HasField("dim_value")
    return ModelFacts(
        what=path.name,
        input_channels=int(dims[1].dim_value) if fixed else 3,
        outputs=tuple(output.name for output in proto.graph.output),
    )


def _check_plain_config(path: Path, config: ModelConfig) -> None:
    """One-line ``ValueError`` naming the key, for a config the graft would fail on: a
    default ``method`` the file cannot take, or values the graph contradicts
    (:func:`~fam_core.models.model_check.check_against_model`: ``channels``, ``mean``,
    ``std``, ``output``)."""
    where = f"model {config.name!r}: "
    if config.method is not None:
        reasons = graftable_methods(config.task)
        if config.method not in reasons:
            raise ValueError(
                f"{where}method: unknown method {config.method!r}; expected one of "
                f"{[m for m, reason in reasons.items() if reason is None]}"
            )
        if reasons[config.method] is not None:
            raise ValueError(f"{where}method: {config.method!r} {reasons[config.method]}")
    check_against_model(config, graph_facts(path))

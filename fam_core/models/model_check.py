"""A config checked against the model it describes, at load: the one place of these rules.

:class:`~fam_core.models.store.ModelConfig` checks each value on its own (its kind, the
source it goes with). What only the model can say is checked here, for every front door
(``fam explain``, ``fam inspect``, the servers' model registry, TorchServe, KServe): the
loaders gather :class:`ModelFacts` (torch: :func:`torch_facts` runs the module once on a
``[1, channels, H, W]`` input; ONNX: the graph's input and outputs) and
:func:`check_against_model` raises one ``ValueError`` naming the config key:

- ``input_size`` / ``channels``: the model runs on an input of that size and channels;
- ``mean``, ``std``: one value, or one per input channel;
- ``output``: names an output the model has (the message lists them);
- the selected output is ``[B, D]``;
- ``class_names``: one per classifier output, or one per prototype;
- ``prototypes``: ``[K, D]`` with the model's ``D``.

Example:
    >>> from fam_core.models.store import ModelConfig
    >>> config = ModelConfig(name="m", task="classifier", onnx="m.onnx", class_names=("a", "b"))
    >>> check_against_model(config, ModelFacts(output_shape=(1, 10)))
    Traceback (most recent call last):
    ...
    ValueError: model 'm': class_names: 2 names for a classifier with 10 outputs: expected 10 names (or none)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fam_core.anatomy.adapters import input_channels
from fam_core.models.config_schema import IMAGENET_MEAN, IMAGENET_STD, channel_mismatch

if TYPE_CHECKING:
    from fam_core.models.store import ModelConfig


@dataclass(frozen=True)
class ModelFacts:
    """What loading found out about a model (``None``: not known at this point).

    Attributes:
        what: how messages name the model, e.g. ``"the model"`` or ``"model.onnx"``.
        input_channels: the channels its input takes.
        outputs: the names (or indices) of its outputs; ``()`` for a model that returns one
            tensor.
        output_shape: the shape of the selected output on a one-image batch.
        prototypes_shape: the shape of the config's prototypes.
        prototypes: the number of prototypes built into the model (an exported graph).
        output_error: why the configured output could not be selected from the model's.
    """

    what: str = "the model"
    input_channels: int | None = None
    outputs: tuple[str | int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    prototypes_shape: tuple[int, ...] | None = None
    prototypes: int | None = None
    output_error: str | None = None


def config_problems(config: ModelConfig, facts: ModelFacts) -> list[tuple[str, str]]:
    """``(key, what is wrong)`` for each config value the model contradicts.

    Example:
        >>> from fam_core.models.store import ModelConfig
        >>> config = ModelConfig(name="m", task="embedding", factory="a:b", output="image_embed")
        >>> config_problems(config, ModelFacts(outputs=("last_hidden_state", "pooler_output")))
        [('output', "the model has no output 'image_embed'; its outputs are ['last_hidden_state', 'pooler_output']")]
    """
    problems: list[tuple[str, str]] = []
    channels = facts.input_channels
    if channels is not None:
        if config.channels not in (3, channels):  # 3: the default, which the graph overrides
            problems.append(
                ("channels", f"the config says {config.channels}, {facts.what} takes {channels}")
            )
        defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        for key in ("mean", "std"):
            values = tuple(getattr(config, key))
            if channels in (1, 3) and len(values) not in (1, channels):
                unset = f" (ImageNet's {key}: the default)" if values == defaults[key] else ""
                problems.append(
                    (
                        key,
                        f"{facts.what} takes {channels} channel(s): "
                        f"{channel_mismatch(len(values), channels)}{unset}",
                    )
                )
    problem = None
    if config.output is not None and facts.outputs is not None:
        problem = _output_problem(config.output, facts.outputs, facts.what)
    if problem is not None or facts.output_error is not None:
        problems.append(("output", problem or str(facts.output_error)))
    shape = facts.output_shape
    if shape is not None and len(shape) != 2:
        problems.append(
            (
                "output",
                f"expected [B, D] embeddings or logits (or [B, C, h, w] maps, pooled), got shape "
                f"{list(shape)}",
            )
        )
    elif (
        shape is not None
        and config.task == "classifier"
        and config.class_names
        and len(config.class_names) != shape[1]
    ):
        problems.append(
            (
                "class_names",
                f"{len(config.class_names)} names for a classifier with {shape[1]} outputs: "
                f"expected {shape[1]} names (or none)",
            )
        )
    prototypes = facts.prototypes
    found = facts.prototypes_shape
    if found is not None:
        if shape is not None and len(shape) == 2 and (len(found) != 2 or found[1] != shape[1]):
            problems.append(("prototypes", f"have shape {tuple(found)}, expected [K, {shape[1]}]"))
        prototypes = found[0] if found else None
    if (
        config.task == "embedding"
        and config.class_names
        and prototypes
        and len(config.class_names) != prototypes
    ):
        problems.append(
            (
                "class_names",
                f"{len(config.class_names)} labels for {prototypes} prototypes: expected "
                f"{prototypes} (one per prototype, or none)",
            )
        )
    return problems


def check_against_model(config: ModelConfig, facts: ModelFacts) -> None:
    """One-line ``ValueError`` ``model NAME: KEY: reason`` for the first of
    :func:`config_problems`."""
    for key, problem in config_problems(config, facts):
        raise ValueError(f"model {config.name!r}: {key}: {problem}")


def _output_problem(spec: str | int, outputs: Sequence[str | int], what: str) -> str | None:
    if not outputs:
        return f"{what} returns one tensor: drop output: (got {spec!r})"
    if isinstance(spec, int) and not isinstance(spec, bool):
        if -len(outputs) <= spec < len(outputs):
            return None
        return f"index {spec} is out of range for {what}'s {len(outputs)} outputs {list(outputs)}"
    if spec in outputs:
        return None
    return f"{what} has no output {spec!r}; its outputs are {list(outputs)}"


def torch_facts(module: nn.Module, config: ModelConfig) -> ModelFacts:
    """Run ``module`` once on a zero ``[1, channels, H, W]`` input (the config's channels and
    ``input_size``) and read its outputs. A model that does not run raises one line naming
    ``channels`` (its first convolution takes other channels) or ``input_size``.

    Example:
        >>> from fam_core.models.store import ModelConfig
        >>> config = ModelConfig(name="m", task="classifier", factory="a:b", input_size=8)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> torch_facts(net, config).output_shape
        (1, 4)
    """
    from fam_core.anatomy.outputs import output_names, select_output

    height, width = config.image_size
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    image = torch.zeros(1, config.channels, height, width, device=device)
    try:
        with torch.no_grad():
            raw = module(image.to(dtype or torch.float32))
    except Exception as error:  # noqa: BLE001 - the user's model may raise anything
        raise ValueError(f"model {config.name!r}: {_run_failure(module, config, error)}") from None
    try:
        selected = select_output(raw, config.output)
    except (ValueError, TypeError) as error:  # check_against_model names the output at fault
        return ModelFacts(
            input_channels=config.channels,
            outputs=output_names(raw),
            output_error=str(error).strip().splitlines()[0],
        )
    shape = tuple(selected.shape)
    return ModelFacts(
        input_channels=config.channels,
        output_shape=shape[:2] if len(shape) == 4 else shape,  # maps: pooled by the explainers
        prototypes_shape=_prototypes_shape(config),
    )


def check_torch_model(module: nn.Module, config: ModelConfig) -> ModelFacts:
    """:func:`torch_facts` checked with :func:`check_against_model`: what every torch front
    door runs at load."""
    facts = torch_facts(module, config)
    check_against_model(config, facts)
    return facts


def _prototypes_shape(config: ModelConfig) -> tuple[int, ...] | None:
    if config.task != "embedding" or config.prototypes is None:
        return None
    return tuple(config.load_prototypes().shape)  # type: ignore[union-attr]


def _run_failure(module: nn.Module, config: ModelConfig, error: Exception) -> str:
    """``key: reason`` for a model that does not run on the config's probe input."""
    height, width = config.image_size
    text = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else ""
    failed = (
        f"a [1, {config.channels}, {height}, {width}] input failed: {type(error).__name__}: {text}"
    )
    takes = input_channels(module)
    if takes is not None and takes != config.channels:
        return (
            f"channels: {failed}; the model's first convolution takes {takes} channel(s): "
            f"set channels: {takes} (with mean: and std: to match)"
        )
    advice = "set input_size: to the size the model takes"
    own = _model_image_size(module)
    if own is not None and own != (height, width):
        side = own[0] if own[0] == own[1] else list(own)
        advice = f"its config.image_size is {side}: set input_size: {side}"
    default = " (the default when the config sets none)" if config.input_size == 84 else ""
    return f"input_size: {failed}; input_size is {height}x{width}{default}: {advice}"


def _model_image_size(module: nn.Module) -> tuple[int, int] | None:
    """The ``config.image_size`` of a ``transformers`` model (or a module inside it)."""
    for inner in module.modules():
        size = getattr(getattr(inner, "config", None), "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return (size, size)
        if isinstance(size, list | tuple) and len(size) == 2:
            return (int(size[0]), int(size[1]))
    return None

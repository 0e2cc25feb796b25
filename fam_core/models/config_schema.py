"""The keys of a model's ``config.yaml``: one :class:`KeySpec` each, in :data:`KEYS`.

The table is the single description of a config: :class:`~fam_core.models.store.ModelConfig`
reads its known keys, required keys, file keys and the sources each key goes with from it,
checks each value's kind with :func:`value_problem`, and ``scripts/config_reference.py``
writes the docs' config reference (``docs/config.md``) from it. A new key is one
:class:`KeySpec` here plus its ``ModelConfig`` field (``tests/models/test_config_schema.py`` fails
when the two disagree, or when the committed page differs from the generated one).

Example:
    >>> SPECS["input_size"].default, SPECS["input_size"].type_text
    (84, 'int or [H, W]')
    >>> value_problem(SPECS["resize"], "squash")
    "expected one of ['crop', 'resize', 'letterbox'], got 'squash'"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fam_core.images.resize import DEFAULT_POLICY, RESIZE_POLICIES, as_size
from fam_core.maths.similarity import SIMILARITIES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES: tuple[str, ...] = ("backbone", "factory", "exported_program", "onnx")
"""The model sources a config may name: exactly one of them."""
TORCH_SOURCES: tuple[str, ...] = ("backbone", "factory", "exported_program")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a key every config must give."""

KIND_TYPES: dict[str, str] = {
    "name": "string",
    "string": "string",
    "file": "file name (relative to the config)",
    "mapping": "mapping",
    "int": "int",
    "number": "number",
    "bool": "true or false",
    "numbers": "list of numbers",
    "strings": "list of strings",
    "size": "int or [H, W]",
    "key or index": "string or int",
    "choice": "one of",
}
"""How each kind of value reads in the docs."""


@dataclass(frozen=True)
class KeySpec:
    """One config key: its kind, default, an example value (YAML), what it does, and the
    sources that take it (``()``: every source).

    Example:
        >>> SPECS["weights"].sources
        ('backbone', 'factory')
    """

    name: str
    kind: str
    default: Any
    example: str
    doc: str
    sources: tuple[str, ...] = ()
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KIND_TYPES:
            raise ValueError(
                f"{self.name}: unknown kind {self.kind!r}; expected {list(KIND_TYPES)}"
            )
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"{self.name}: choices go with the kind 'choice' (and only with it)")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type_text(self) -> str:
        """The value's type as the docs write it."""
        if self.kind == "choice":
            return "one of " + ", ".join(f"`{c}`" for c in self.choices)
        return KIND_TYPES[self.kind]


KEYS: tuple[KeySpec, ...] = (
    KeySpec("name", "name", REQUIRED, "my-model",
            "The name requests use (`fam explain --model NAME`, the request's `model`)."),
    KeySpec("task", "choice", REQUIRED, "classifier",
            "What the model outputs: class logits, or an embedding; `knn`: an embedding "
            "model that classifies by the weighted vote of its `k` nearest labelled images in "
            "`index` (NPID).",
            choices=("embedding", "classifier", "knn")),
    KeySpec("backbone", "string", None, "conv4",
            "Source: a built-in architecture (`fam_core.models.backbones.BACKBONES`), with "
            "`backbone_kwargs` and `weights`.", sources=("backbone",)),
    KeySpec("factory", "string", None, "mymodels:build",
            "Source: `package.module:callable` that builds the module (imported from the "
            "installed packages, or from `module.py` next to the config), called with "
            "`factory_kwargs`; `weights` (optional) are loaded into it.", sources=("factory",)),
    KeySpec("exported_program", "file", None, "model.pt2",
            "Source: a `torch.export.save` file (none of your code is needed to serve it).",
            sources=("exported_program",)),
    KeySpec("onnx", "file", None, "model.onnx",
            "Source: an ONNX graph; one `fam export` did not write is grafted with an "
            "explanation head at `target_tensor`.", sources=("onnx",)),
    KeySpec("weights", "file", None, "model.pt",
            "A state dict, loaded with `torch.load(..., weights_only=True)`; required with "
            "`backbone`.", sources=("backbone", "factory")),
    KeySpec("backbone_kwargs", "mapping", {}, "{width: 1}",
            "Keyword arguments of the backbone.", sources=("backbone",)),
    KeySpec("factory_kwargs", "mapping", {}, "{num_labels: 10}",
            "Keyword arguments of the factory.", sources=("factory",)),
    KeySpec("input_size", "size", 84, "[256, 128]",
            "The model's input side in pixels, or `[H, W]`. Images are fitted to it by "
            "`resize`. Not read from the model: a model built for another size (e.g. a "
            "`transformers` ViT's `image_size`) needs it set."),
    KeySpec("resize", "choice", DEFAULT_POLICY, "letterbox",
            "How images are fitted to `input_size`: `crop` (resize the short side, then "
            "centre-crop), `resize` (stretch) or `letterbox` (pad in the `mean` colour).",
            choices=tuple(RESIZE_POLICIES)),
    KeySpec("mean", "numbers", IMAGENET_MEAN, "[0.5, 0.5, 0.5]",
            "Per-channel mean of `[0, 1]` images: `(x - mean) / std`. One value per input "
            "channel, or one value for all of them. Default: ImageNet's."),
    KeySpec("std", "numbers", IMAGENET_STD, "[0.5, 0.5, 0.5]",
            "Per-channel standard deviation (non-zero), as `mean`. Default: ImageNet's."),
    KeySpec("channels", "choice", 3, "1",
            "The model's input channels: 3 (RGB) or 1 (greyscale: images become their "
            "ITU-R BT.601 luminance). An `onnx` graph's input says it.", choices=(1, 3)),
    KeySpec("target_layer", "string", None, "encoder.layer.10",
            "The layer explainers read (a name from `model.named_modules()`); default: found "
            "from the dataflow (`fam inspect` shows the candidates). Not with `onnx` (use "
            "`target_tensor`)."),
    KeySpec("target_tensor", "string", None, "/layer4/relu_2/Relu_output_0",
            "The feature-map value the explanation head is grafted at; default: "
            "found as in torch.", sources=("onnx",)),
    KeySpec("output", "key or index", None, "pooler_output",
            "Which model output is the embedding or the logits: a key or an index (`onnx`: a "
            "graph output's name). Default: the output itself if it is a tensor, else the "
            "first of `logits`, `image_embeds`, `embeddings`, `embedding`, `pooler_output` "
            "(`onnx`: the first `[B, D]` output)."),
    KeySpec("layout", "choice", None, "NHWC",
            "The ONNX graph input's layout; default: detected.", sources=("onnx",),
            choices=("NCHW", "NHWC")),
    KeySpec("method", "string", None, "gradcam",
            "The explanation method of a request that names none (a name from `fam explain "
            "--help`); default: FAM for embedding models, CAM for classifiers whose head is "
            "global average pooling + linear, else Grad-CAM (`fam inspect` prints it)."),
    KeySpec("class_names", "strings", (), "[cat, dog]",
            "A classifier's classes (one per output), or the labels of `prototypes` (one per "
            "prototype). Default: the class index."),
    KeySpec("prototypes", "file", None, "gallery.pt",
            "Embedding models: a `[K, D]` tensor file queries are matched against."),
    KeySpec("similarity", "choice", "cosine", "dot",
            "The similarity the embedding model was trained for: what FAM and Grad-FAM "
            "decompose (the scores against prototypes are cosine similarities).",
            choices=SIMILARITIES),
    KeySpec("index", "string", None, "gallery.db",
            "Embedding and `knn` models: the gallery index searched (a Milvus Lite `.db` path "
            "relative to the config, or `http(s)://HOST:PORT[#COLLECTION]` for a Milvus "
            "server), built by `fam index build`."),
    KeySpec("index_search", "mapping", {}, "{ef: 128}",
            "Search parameters replacing those `index` was built with: `ef` of an `HNSW` "
            "index, `nprobe` of an `IVF_FLAT` one (`fam index info` shows them; "
            "[choosing the index type](search.md#choosing-the-index-type))."),
    KeySpec("top_k", "int", 10, "20",
            "Neighbours a search returns when a request names none (with `index`)."),
    KeySpec("explain", "choice", "query", "both",
            "The maps a search draws when a request names none (with `index`): `none`, "
            "`query` (the query's map per neighbour) or `both` (each neighbour's too).",
            choices=("none", "query", "both")),
    KeySpec("k", "int", 200, "50",
            "`knn` models: the neighbours that vote (NPID: 200)."),
    KeySpec("temperature", "number", 0.07, "0.1",
            "`knn` models: the vote's temperature, `exp(s / temperature)` (NPID: 0.07)."),
    KeySpec("metrics", "mapping", {}, "{accuracy: 0.91}",
            "What the training script measured (shown, never checked)."),
)  # fmt: skip
"""Every key of a config, in the order the docs list them."""

SPECS: dict[str, KeySpec] = {spec.name: spec for spec in KEYS}


def channel_mismatch(values: int, channels: int) -> str:
    """What a ``mean`` / ``std`` of ``values`` numbers for a ``channels``-channel model lacks.

    Example:
        >>> channel_mismatch(3, 1)
        'got 3 values for a 1-channel (greyscale) model: expected one value, e.g. [0.5]'
    """
    if channels == 1:
        return (
            f"got {values} values for a 1-channel (greyscale) model: expected one value, e.g. [0.5]"
        )
    return f"got {values} values for a {channels}-channel model: expected 1 or {channels}"


def value_problem(spec: KeySpec, value: Any) -> str | None:
    """What is wrong with ``value`` for ``spec``'s kind (``None``: nothing, or ``None`` where
    the key is optional)."""
    if value is None and spec.default is None:
        return None
    if spec.kind == "choice":
        if value in spec.choices and not isinstance(value, bool):
            return None
        if len(spec.choices) == 2:
            return f"expected {spec.choices[0]} or {spec.choices[1]}, got {value!r}"
        return f"expected one of {list(spec.choices)}, got {value!r}"
    if spec.kind == "name":
        return (
            None
            if isinstance(value, str) and value
            else (f"expected a non-empty string, got {value!r}")
        )
    if spec.kind in ("string", "file"):
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if spec.kind == "mapping":
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if spec.kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if spec.kind in ("int", "number"):
        kinds = int if spec.kind == "int" else int | float
        fits = isinstance(value, kinds) and not isinstance(value, bool)
        return (
            None
            if fits
            else f"expected a{'n int' if spec.kind == 'int' else ' number'}, got {value!r}"
        )
    if spec.kind == "numbers":
        numbers = (
            isinstance(value, tuple)
            and value
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
        return None if numbers else (f"expected a list of numbers (one per channel), got {value!r}")
    if spec.kind == "strings":
        strings = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        return None if strings else f"expected a list of strings, got {value!r}"
    if spec.kind == "key or index":
        fits = isinstance(value, str | int) and not isinstance(value, bool)
        return None if fits else f"expected a key (string) or an index (int), got {value!r}"
    try:  # "size"
        as_size(value)
    except (TypeError, ValueError):
        return f"expected an int or [H, W], got {value!r}"
    return None


def _markdown_value(value: Any) -> str:
    """A default as a config would write it."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "not set"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def reference_markdown() -> str:
    """The docs' config reference page (``docs/config.md``), written from :data:`KEYS`.

    Example:
        >>> print(reference_markdown().splitlines()[0])
        # Model config reference
    """
    lines = [
        "# Model config reference",
        "",
        "<!-- Generated from fam_core/models/config_schema.py by "
        "`python scripts/config_reference.py`: edit the table there, not this page. -->",
        "",
        "A model served or explained from a `config.yaml` ([Your own model](own-model.md#serving-"
        "your-model-from-a-config)) names exactly one source: "
        + ", ".join(f"`{s}`" for s in SOURCES)
        + ". File names are relative to the config's folder. A key the table does not list is "
        "refused, and so is a key of another source. Configs in YAML's block style need PyYAML "
        "(the `serve` and `torchserve` extras install it); YAML's JSON form needs nothing.",
        "",
        "| key | type | default | example | what it does |",
        "|---|---|---|---|---|",
    ]
    for spec in KEYS:
        doc = spec.doc
        if spec.sources and spec.sources != (spec.name,):
            doc += " With " + ", ".join(f"`{s}`" for s in spec.sources) + " only."
        row = (
            f"`{spec.name}`",
            spec.type_text,
            f"`{_markdown_value(spec.default)}`" if not spec.required else "required",
            f"`{spec.name}: {spec.example}`",
            doc,
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines += [
        "",
        "## Checked at load",
        "",
        "Every value is checked when the config is read (its type, its source), then against "
        "the model when the model is loaded, the same way for `fam explain`, `fam inspect`, "
        "`fam serve` (fam.v1, the Open Inference Protocol), TorchServe and KServe "
        "(`fam_core/models/model_check.py`): the model runs once on a `[1, channels, H, W]` "
        "input of `input_size`; `mean` and `std` have one value or one per input channel; "
        "`output` names an output the model has (the message lists them) and selects "
        "`[B, D]`; `class_names` has one name per classifier output, or one label per "
        "prototype; `prototypes` are `[K, D]`. A config that fails is one line naming the "
        "key: `fam explain` and `fam inspect` exit with 2, a server serves its other models "
        "and reports this one as not ready with the reason (requests for it: `UNAVAILABLE` / "
        "503 with the reason, KServe's readiness routes included).",
        "",
        "```text",
        "fam: error: model 'reid': output: the model has no output 'image_embed'; its outputs "
        "are ['last_hidden_state', 'pooler_output']",
        "```",
        "",
        "## Defaults",
        "",
        "A config that leaves a key out gets the default above. `input_size` is 84 (the size of "
        "the bundled demo models) and is not read from the model: a model built for another "
        "size fails at load with the size to set (for a `transformers` model, its "
        "`config.image_size`). `resize` is `crop`; `mean` and `std` are ImageNet's, "
        f"`{list(IMAGENET_MEAN)}` and `{list(IMAGENET_STD)}`. `target_layer` is found from "
        "the model's dataflow (`fam inspect` shows the candidates and the choice).",
        "",
    ]
    return "\n".join(lines)

"""Run every registered explainer x metric on the evaluation settings (``fam eval``)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

import fam_core.explainers  # noqa: F401  (registers the built-in methods)
from fam_core.evaluation import SETTING_NAMES
from fam_core.evaluation.resolution import RESOLUTIONS, map_resolution, setting_name
from fam_core.evaluation.scenes import SCENE_METRICS, scene_metrics, scene_settings
from fam_core.evaluation.settings import Setting, classifier_setting, embedding_settings
from fam_core.evaluation.summary import PerImage, summarise
from fam_core.explainers.base import Explainer
from fam_core.explainers.registry import available_methods, get_explainer
from fam_core.explainers.relevant.relevant import RelevantFeatures
from fam_core.explanation import Explanation
from fam_core.messages import typed_first_line
from fam_core.metrics import faithfulness as faith
from fam_core.metrics import localisation as loc
from fam_core.metrics import relevance
from fam_core.metrics.sanity import cascading_randomisation
from fam_core.models.store import LoadedModel, load_model
from fam_core.tasks.retrieval import average_precision

METRICS: dict[str, str] = {
    "proportion": "energy pointing game proportion, eq. 19 (higher is better)",
    "box_iou": "IoU of the estimated box, eq. 20 (higher is better)",
    "pointing": "pointing game accuracy on the mask (higher is better)",
    "iou_auc": "area under the mask IoU curve (higher is better)",
    "average_drop": "Average Drop %, eq. 21 (lower is better)",
    "increase_confidence": "Increase in Confidence %, eq. 22 (higher is better)",
    "deletion_auc": "deletion AUC (lower is better)",
    "insertion_auc": "insertion AUC (higher is better)",
    "explanation_map_ap": "explanation-map retrieval AP, Wu et al. app. A (higher is better)",
    **SCENE_METRICS,
}
RELEVANCE_METRICS: dict[str, str] = {
    "accuracy": "accuracy of the classifier on the held-out test split",
    "relevant_accuracy": "accuracy with every relevant feature (any class) zeroed, sec. 4.1",
    "random_accuracy": "accuracy with as many random features zeroed (mean of 5 draws)",
    "relevant_drop": "accuracy drop from the relevant features (larger than random is better)",
    "random_drop": "accuracy drop from as many random features",
    "features": "number of relevant features of any class at mu = RELEVANCE_MU",
    "per_class_*": "the same, zeroing for class j's images only the features of w_j",
    "reconstruction_auc": "class reconstruction mean ROC AUC of x w_j, by mu (supp. sec. 8)",
    "images": "test images the accuracies are measured on (every class equally)",
}
RELEVANCE_MU = 10.0  # the sparsity budget of Oramas et al. sec. 4.1
RELEVANCE_ITERATIONS = 2000  # mu-Lasso iterations per fit (each fit of eq. 1 takes seconds)
BATCH = 16


class NotApplicable(Exception):
    """A method that does not apply to a setting; the message says why (recorded as skipped)."""


@dataclass(frozen=True)
class EvalOptions:
    """What ``fam eval`` runs. ``images``: explained images per setting; ``scenes``: scenes
    per scene setting (one explained pair per flower); ``settings``:
    the settings evaluated (all by default); ``episodes``:
    few-shot episodes for the accuracy; ``steps``: deletion/insertion points;
    ``sanity_images``: images of the randomisation test (0 skips it; it runs on the first
    resolution's models); ``resolutions``: which model pairs run every setting (coarse: the
    5x5 default models, fine: their 10x10 twins)."""

    images: int = 16
    scenes: int = 6  # scenes per scene setting; each gives one explained pair per flower (2-4)
    episodes: int = 600
    seed: int = 0
    methods: tuple[str, ...] | None = None
    settings: tuple[str, ...] | None = None  # None: every setting
    steps: int = 10
    sanity_images: int = 4
    embedding_model: str = "default-embedding"
    classifier_model: str = "default-classifier"
    fine_embedding_model: str = "default-embedding-fine"
    fine_classifier_model: str = "default-classifier-fine"
    resolutions: tuple[str, ...] = ("coarse",)  # each runs every setting on its two models

    def models(self, resolution: str) -> tuple[str, str]:
        """``(embedding model, classifier model)`` of a resolution in :data:`RESOLUTIONS`."""
        if resolution == "coarse":
            return self.embedding_model, self.classifier_model
        if resolution == "fine":
            return self.fine_embedding_model, self.fine_classifier_model
        raise ValueError(f"unknown resolution {resolution!r}; expected one of {RESOLUTIONS}")


@dataclass
class EvalResult:
    """Everything ``results.json`` holds (see :func:`run_evaluation`).

    ``per_image[setting][method][metric]`` is a tensor ``[N]`` with one value per explained
    image (``nan`` where an image has none); :func:`summarise_result` turns it into
    ``metrics`` (means), ``intervals`` (95 % bootstrap intervals) and ``comparisons`` (FAM
    against each other method, paired on the same images), for any setting and metric name.
    ``per_image`` is written to ``per_image.pt``, not to ``results.json``.
    """

    options: dict[str, Any]
    methods: list[str]
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    intervals: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    comparisons: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    sanity: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    relevance: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime_seconds: float = 0.0
    # seconds per stage ("tasks", "<method>/<setting>", "sanity/<method>/<setting>",
    # "relevance"): wall clock and process CPU time, to size longer runs (docs/evaluation.md)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    example_images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    per_image: dict[str, PerImage] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(replace(self, examples={}, example_images={}, per_image={}))
        data.pop("examples")
        data.pop("example_images")
        data.pop("per_image")
        data["metric_descriptions"] = METRICS
        data["relevance_descriptions"] = RELEVANCE_METRICS
        return data


def discover_explainers() -> dict[str, str]:
    """Import every module of :mod:`fam_core.explainers` and of its family subpackages so that
    each ``@register``-ed method is available; return ``{module: reason}`` for modules that
    fail to import."""
    failures = {}
    packages = [(fam_core.explainers.__path__, "fam_core.explainers.")]
    while packages:
        path, prefix = packages.pop(0)
        for info in pkgutil.iter_modules(path, prefix):
            try:
                module = importlib.import_module(info.name)
            except Exception as error:  # a broken method must not stop the evaluation of others
                failures[info.name] = typed_first_line(error)
                continue
            if info.ispkg:
                packages.append((module.__path__, f"{info.name}."))
    return failures


def resolve_methods(requested: tuple[str, ...] | None) -> list[str]:
    """The registered methods to run (all by default); unknown names raise ``ValueError``."""
    registered = available_methods()
    if not requested:
        return registered
    unknown = [m for m in requested if m not in registered]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered methods are {registered}")
    return list(dict.fromkeys(requested))


def build_explainer(method: str, setting: Setting) -> Explainer:
    """The method with default arguments for the setting's model, built as every explainer
    is (``cls(model, target_layer=..., **options)``); a method that needs arguments
    without defaults raises ``TypeError``."""
    cls = get_explainer(method)
    config = setting.loaded.config
    if cls.needs_fitting:  # the explainer's own declaration (fam_core.explainers.registry)
        return fit_explainer(cls, setting)
    return cls(setting.loaded.model, target_layer=config.target_layer, similarity=config.similarity)


def fit_options(method: str) -> dict[str, Any]:
    """The evaluation's ``fit`` keyword arguments for a method that needs fitting.

    Example:
        >>> fit_options("relevant-features")
        {'mu': 10.0, 'iterations': 2000}
    """
    if method == RelevantFeatures.method:
        return {"mu": RELEVANCE_MU, "iterations": RELEVANCE_ITERATIONS}
    return {}


def fit_explainer(
    cls: type[Explainer], setting: Setting, options: dict[str, Any] | None = None
) -> Explainer:
    """An explainer that declares ``needs_fitting``, built with its defaults and fitted on the
    setting's labelled fit images; they exist in the classifier setting only, so other
    settings raise NotApplicable."""
    if not setting.classifier or setting.fit_images is None or setting.fit_labels is None:
        raise NotApplicable(
            f"{cls.method} is fitted on labelled training images (it needs fitting): it "
            "applies to the classifier setting only"
        )
    explainer = cls(setting.loaded.model)  # type: ignore[call-arg]
    inputs = setting.loaded.config.normalize(setting.fit_images)
    fit = explainer.fit  # type: ignore[attr-defined]
    return fit(inputs, setting.fit_labels, **(fit_options(cls.method) | (options or {})))


def fit_relevant_features(setting: Setting, mu: float = RELEVANCE_MU) -> RelevantFeatures:
    """RelevantFeatures (Oramas et al.) fitted with the mu-Lasso (eq. 1) on the setting's
    labelled fit images; it explains classes, so embedding settings raise NotApplicable."""
    fitted = fit_explainer(RelevantFeatures, setting, {"mu": mu})
    assert isinstance(fitted, RelevantFeatures)
    return fitted


def relevance_metrics(
    setting: Setting, seed: int, explainer: RelevantFeatures | None = None
) -> dict[str, Any]:
    """Feature-relevance metrics of the classifier setting (Oramas et al. sec. 4.1, supp. 8):
    the accuracy drop under ablation of the relevant features vs as many random features,
    and the class reconstruction mean-AUC over mu, both on the whole held-out test split
    (every class equally represented; the few explained images would leave most classes out)."""
    if setting.test_images is None or setting.test_labels is None:
        raise NotApplicable("feature relevance needs the classifier setting's test split")
    explainer = explainer or fit_relevant_features(setting)
    normalize = setting.loaded.config.normalize
    inputs, labels = normalize(setting.test_images), setting.test_labels
    values: dict[str, Any] = relevance.ablation_accuracy_drop(explainer, inputs, labels, seed=seed)
    per_class = relevance.ablation_accuracy_drop(
        explainer, inputs, labels, seed=seed, per_class=True
    )
    values.update({f"per_class_{k}": v for k, v in per_class.items() if k != "accuracy"})
    curve = relevance.reconstruction_auc_over_mu(
        explainer,
        normalize(setting.fit_images),
        setting.fit_labels,
        inputs,
        labels,
        num_classes=len(setting.loaded.config.class_names),
        iterations=RELEVANCE_ITERATIONS,
    )
    values["reconstruction_auc"] = {str(mu): round(auc, 4) for mu, auc in curve.items()}
    values["mu"] = RELEVANCE_MU
    values["images"] = len(labels)
    return values


def eq21_masked_images(setting: Setting, maps: torch.Tensor) -> torch.Tensor:
    """The masked images of eq. 21-22: ``L ∘ X`` on the model's normalised input."""
    return faith.masked_model_input(setting.images, maps, setting.loaded.config.mean)


def explain(
    explainer: Explainer, setting: Setting, target: Any, images: torch.Tensor
) -> Explanation:
    """Explain ``images`` in batches against the matching rows of ``target``."""
    inputs = setting.loaded.config.normalize(images)
    parts = []
    for start in range(0, len(inputs), BATCH):
        rows = slice(start, start + BATCH)
        parts.append(explainer(inputs[rows], target=target[rows]))
    return Explanation.concat(parts)


def evaluate_maps(
    setting: Setting, maps: torch.Tensor, steps: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Every metric of one method's maps on one setting, per image (``{metric: [B]}``, on the
    CPU), and its mean deletion/insertion curves (scene settings: the scene metrics of
    :mod:`.scenes` only, per pair or per scene, and no curves)."""
    if setting.scene is not None:  # the matched / other flowers and target sensitivity only
        return scene_metrics(setting, maps)[1], {}
    images = setting.images
    values = {
        "proportion": loc.energy_pointing_proportion(maps, setting.boxes),
        "box_iou": loc.box_iou(maps, setting.boxes),
        "pointing": loc.pointing_game(maps, setting.masks),
        "iou_auc": loc.area_under_iou_curve(maps, setting.masks),
    }
    scores = setting.score(images)
    masked = setting.score(eq21_masked_images(setting, maps))
    values["average_drop"] = faith.relative_drops(scores, masked)
    values["increase_confidence"] = faith.confidence_increases(scores, masked)
    deletion = faith.deletion_curve(setting.score, images, maps, steps=steps)
    insertion = faith.insertion_curve(setting.score, images, maps, steps=steps)
    values["deletion_auc"] = faith.curve_auc(deletion)
    values["insertion_auc"] = faith.curve_auc(insertion)
    if setting.gallery is not None:
        gallery, gallery_labels = setting.gallery
        values["explanation_map_ap"] = faith.explanation_map_average_precision(
            lambda x: _embed(setting, x),
            images,
            maps,
            setting.labels,
            gallery,
            gallery_labels,
            similarity=setting.loaded.config.similarity,
        )
    curves = {
        "deletion": deletion.mean(dim=0).tolist(),
        "insertion": insertion.mean(dim=0).tolist(),
    }
    return {k: v.detach().float().cpu() for k, v in values.items()}, curves


def summarise_result(result: EvalResult, seed: int) -> None:
    """Fill ``metrics``, ``intervals`` and ``comparisons`` of every setting in
    ``result.per_image`` (see :func:`fam_core.evaluation.summary.summarise`)."""
    for name, per_method in result.per_image.items():
        intervals, comparisons = summarise(per_method, seed=seed)
        result.intervals[name] = intervals
        result.comparisons[name] = comparisons
        result.metrics[name] = {
            method: {metric: interval["mean"] for metric, interval in values.items()}
            for method, values in intervals.items()
        }


def _embed(setting: Setting, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return setting.loaded.model(setting.loaded.config.normalize(images))


def sanity_check(method: str, setting: Setting, count: int, seed: int) -> dict[str, Any]:
    """Cascading randomisation of ``setting``'s model for ``method`` on its first images."""
    images = setting.images[:count]

    def maps_for(model: torch.nn.Module) -> torch.Tensor:
        proxy = replace(setting, loaded=LoadedModel(model, setting.loaded.config))
        explainer = build_explainer(method, proxy)
        return explain(explainer, proxy, setting.retarget(model)[:count], images).maps

    result = cascading_randomisation(setting.loaded.model, maps_for, seed=seed)
    return {
        "layers": list(result.layers),
        "correlations": [round(c, 4) for c in result.correlations],
        "threshold": result.threshold,
        "passed": result.passed,
    }


def run_evaluation(
    options: EvalOptions, progress: Callable[[str], None] | None = None
) -> EvalResult:
    """Run the tasks, then every method x setting x metric, then the sanity checks."""
    started = time.perf_counter()
    counts = (options.images, options.scenes, options.episodes, options.steps)
    if min(counts) < 1 or options.sanity_images < 0:
        raise ValueError("images, scenes, episodes and steps must be >= 1 and sanity_images >= 0")
    unknown = set(options.settings or ()) - set(SETTING_NAMES)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {SETTING_NAMES}")
    if not options.resolutions or len(set(options.resolutions)) != len(options.resolutions):
        raise ValueError(f"resolutions must be distinct, some of {RESOLUTIONS}")
    models = [options.models(resolution) for resolution in options.resolutions]
    import_failures = discover_explainers()
    methods = resolve_methods(options.methods)
    torch.manual_seed(options.seed)
    if progress:
        progress("rendering the benchmark and running the tasks")
    clock = _Clock()
    settings: list[Setting] = []
    resolution_of: dict[str, str] = {}  # setting name -> "HxW" of its model's target layer
    sizes: dict[str, str] = {}  # model name -> the same
    for position, (embedding_name, classifier_name) in enumerate(models):
        embedding, classifier = load_model(embedding_name), load_model(classifier_name)
        for setting in [
            *embedding_settings(
                embedding,
                images=options.images,
                episodes=options.episodes,
                seed=options.seed,
                model_name=embedding_name,
            ),
            *scene_settings(
                embedding, images=options.scenes, seed=options.seed, model_name=embedding_name
            ),
            classifier_setting(
                classifier, images=options.images, seed=options.seed, model_name=classifier_name
            ),
        ]:
            if options.settings and setting.name not in options.settings:
                continue
            if setting.model_name not in sizes:
                sizes[setting.model_name] = map_resolution(setting.loaded)
            size = sizes[setting.model_name]
            setting.name = setting_name(setting.name, size, first=position == 0)
            resolution_of[setting.name] = size
            settings.append(setting)
    result = EvalResult(options=asdict(options), methods=methods)
    result.timings["tasks"] = clock.lap()
    for module, reason in import_failures.items():
        result.skipped.setdefault(module, {})["import"] = reason
    for setting in settings:
        result.tasks[setting.name] = setting.task
        result.settings[setting.name] = {
            "model": setting.model_name,
            "resolution": resolution_of[setting.name],
            "images": len(setting.labels),  # scene settings: (scene, reference) pairs
            "asked": options.scenes if setting.scene is not None else options.images,
            "unit": "pairs" if setting.scene is not None else "images",
        }
        if len(setting.labels) == 0:
            continue
        result.example_images[setting.name] = setting.images[:4]
        scores = setting.score(setting.images)
        if setting.gallery is not None:
            original_ap = average_precision(
                _embed(setting, setting.images),
                setting.labels,
                *setting.gallery,
                similarity=setting.loaded.config.similarity,
            )
            result.reference[setting.name] = {"original_image_ap": original_ap.mean().item()}
        result.reference.setdefault(setting.name, {})["mean_score"] = scores.mean().item()

    for setting in settings:
        if len(setting.labels) == 0:
            for method in methods:
                result.skipped.setdefault(method, {})[setting.name] = (
                    "the model handled no evaluation image correctly"
                )
    fitted: dict[str, RelevantFeatures] = {}  # reused by the relevance metrics
    jobs = [(s, m) for m in methods for s in settings if len(s.labels)]
    bar = tqdm(jobs, desc="fam eval", unit="run", file=sys.stderr)
    for setting, method in bar:
        bar.set_postfix_str(f"{method} / {setting.name}")
        clock.lap()
        torch.manual_seed(options.seed)
        try:
            explainer = build_explainer(method, setting)
            maps = explain(explainer, setting, setting.target, setting.images).maps
        except NotApplicable as reason:
            result.skipped.setdefault(method, {})[setting.name] = f"not applicable: {reason}"
            continue
        except (ValueError, TypeError, NotImplementedError, RuntimeError, ImportError) as error:
            # ImportError: a method whose optional extra is missing (LIFT-CAM needs captum)
            result.skipped.setdefault(method, {})[setting.name] = typed_first_line(error)
            continue
        if isinstance(explainer, RelevantFeatures):
            fitted[setting.name] = explainer
        values, curves = evaluate_maps(setting, maps, options.steps)
        result.per_image.setdefault(setting.name, {})[method] = values
        if curves:
            result.curves.setdefault(setting.name, {})[method] = curves
        result.examples.setdefault(setting.name, {})[method] = maps[:4]
        result.timings[f"{method}/{setting.name}"] = clock.lap()
        if options.sanity_images and setting.name in ("few-shot", "classifier"):
            torch.manual_seed(options.seed)
            try:
                result.sanity.setdefault(method, {})[setting.name] = sanity_check(
                    method, setting, options.sanity_images, options.seed
                )
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
                result.skipped.setdefault(method, {})[f"sanity/{setting.name}"] = typed_first_line(
                    error
                )
            result.timings[f"sanity/{method}/{setting.name}"] = clock.lap()
    bar.close()
    clock.lap()
    if "relevant-features" in methods:
        for setting in settings:
            if setting.classifier and len(setting.labels):
                if progress:
                    progress("feature relevance (ablation, class reconstruction)")
                try:
                    result.relevance[setting.name] = relevance_metrics(
                        setting, options.seed, fitted.get(setting.name)
                    )
                except (NotApplicable, ValueError, RuntimeError) as error:
                    result.skipped.setdefault("relevant-features", {})[
                        f"relevance/{setting.name}"
                    ] = typed_first_line(error)
    result.timings["relevance"] = clock.lap()
    summarise_result(result, options.seed)
    result.timings["statistics"] = clock.lap()
    result.runtime_seconds = round(time.perf_counter() - started, 1)
    return result


class _Clock:
    """Wall and process CPU seconds since the previous lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        spent = {"wall": round(wall - self.wall, 2), "cpu": round(cpu - self.cpu, 2)}
        self.wall, self.cpu = wall, cpu
        return spent

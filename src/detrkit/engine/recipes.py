"""Named training recipes: what ``detrkit train --data DIR`` trains when told nothing else.

A recipe fills the :class:`~detrkit.engine.config.TrainConfig` fields the user left unset (``None``); every
explicit option wins. Three parts:

* ``settings``: plain training fields (model, batch, lr, augmentation crops, ...);
* ``model_settings``: the class loss and builder overrides (``model_args``) measured on the recipe's own preset.
  On another preset they must fit it: an explicit ``--recipe`` with a preset that does not take one is an error
  naming the setting and the presets that take it; the automatic choice drops them and says so;
* ``network``: builder overrides that shape the recipe's own preset's network (its backbone's stem), not a way of
  training it: applied to that preset only; another preset keeps its own network;
* the schedule, sized from the dataset: an image size from the training images' sizes and box sizes (rounded to
  32, the RT-DETR encoder's size divisor and DETR's multi-scale step) and a budget of pixels seen, turned into
  epochs for the dataset's number of images (so that a run costs about the same on any dataset).

``auto`` (the default) is ``fast-cpu`` on a CPU and ``gpu`` on a CUDA device; ``paper`` is the preset's published
schedule (``detrkit models`` shows it); ``none`` is the plain fields' defaults (what configs written before
recipes existed mean: ``recipe: false``; ``recipe: true`` meant ``paper``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import torch

from detrkit.data.coco import load_coco_json
from detrkit.engine.config import TrainConfig, dataset_split
from detrkit.losses import build_criterion
from detrkit.registry import list_models, model_info


class RecipeError(ValueError):
    """A recipe name that does not exist, or a recipe setting the chosen preset does not take."""


@dataclass(frozen=True)
class Recipe:
    """A named training recipe (see the module docstring).

    Attributes:
        name: what ``--recipe`` takes.
        summary: one line: what it is for.
        evidence: where its numbers come from (benchmark and results file).
        settings: TrainConfig fields it sets when the user did not.
        model_settings: ``class_loss`` and ``model_args`` measured on ``settings["model"]``.
        network: ``model_args`` for ``settings["model"]`` alone (its architecture; other presets keep theirs).
        pixels_seen: training budget as images x (training size)^2; None = ``epochs`` from ``settings``.
        base_size / max_size: image size for datasets whose objects are big enough at ``base_size``; the most it
            grows to for small objects. ``min_object``: the median box side (px, at the training size) to keep.
        evaluations: how many times a run evaluates (the last epoch always).
    """

    name: str
    summary: str
    evidence: str = ""
    settings: dict = field(default_factory=dict)
    model_settings: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    pixels_seen: float | None = None
    base_size: int = 640
    max_size: int = 640
    min_object: float = 0.0
    evaluations: int = 2


# The demo's recipe (README "The demo", docs/convergence.md): chosen one change at a time on a tuning copy of the
# synthetic data at 2 CPU cores (benchmarks/demo_recipe.py, results/demo_recipe.json): RT-DETR-Lite without
# zoom-out / IoU crops, AdamW, one lr everywhere, no lr drop, DEIM's matchability-aware loss, DDQ's distinct queries
# at IoU 0.5, 50 denoising pairs, batches of 2 (twice the optimizer steps); 3 epochs of 800 images at 224 px;
# evaluated and saved: a moving average of the weights over ~100 steps (decay 0.99; benchmarks/ema_paired.py);
# the original ResNet's 7x7 stem instead of ResNet-vd's three 3x3 convolutions (0.92x the step, the same AP at
# the same steps: results/demo_step_paired_stem.json, ema_paired.json); lr 3e-4 (was 2e-4: the tree crowns' average
# 24.7 against 21.8 AP50 over the last five of 792 steps, ahead at every evaluation; the demo's tuning copy 62.5
# against 60.3 at its end: ema_paired.json).
FAST_CPU = Recipe(
    name="fast-cpu",
    summary="the most AP in ~10 CPU minutes on a small dataset (the demo's recipe), from scratch",
    evidence="benchmarks/demo_recipe.py (results/demo_recipe.json); benchmarks/real_data.py (results/real_data.json); "
             "the EMA: benchmarks/ema_paired.py (results/ema_paired.json)",
    settings=dict(model="rtdetr_lite", batch_size=2, lr=3e-4, lr_backbone=3e-4, crop=False, num_workers=1,
                  ema=True, ema_decay=0.99, ema_warmup=50),
    model_settings=dict(class_loss="mal", model_args={"query_nms": 0.5, "denoising": {"num_dn_pairs": 50}}),
    network=dict(backbone_stem="7x7"),
    pixels_seen=3 * 800 * 224**2,
    base_size=224,
    max_size=448,
    min_object=16.0,
)

# One GPU, batch 16: the CPU recipe's model and losses plus H-DETR's one-to-many queries, which cost nothing
# measurable on a GPU (H200, deformable_detr_lite at batch 4: hybrid + varifocal AP50 17.8 vs 12.0 at 32.6 vs
# 33.4 images/s, results/convergence_ablation_cuda.json) while on 2 CPU cores they cost more time than they buy.
# Not yet measured at batch 16 on rtdetr_lite: benchmarks/gpu.sh runs it on the next GPU lease.
GPU = Recipe(
    name="gpu",
    summary="one GPU, batch 16, with one-to-many (hybrid) queries; from scratch, ~10x the CPU recipe's images",
    evidence="results/convergence_ablation_cuda.json (the one-to-many row); benchmarks/gpu.sh (real_data --recipe gpu)",
    settings=dict(model="rtdetr_lite", batch_size=16, lr=2e-4, lr_backbone=2e-4, crop=False, num_workers=4,
                  warmup_steps=100),
    model_settings=dict(class_loss="mal", model_args={"query_nms": 0.5, "denoising": {"num_dn_pairs": 50},
                                                      "one_to_many": "hybrid"}),
    pixels_seen=30 * 800 * 224**2,
    base_size=320,
    max_size=640,
    min_object=16.0,
    evaluations=4,
)
PAPER = Recipe(name="paper", summary="the preset's published schedule (epochs, lr, lr drop, ...; detrkit models)",
               evaluations=0)
NONE = Recipe(name="none", summary="no recipe: the options' own defaults (what configs before recipes meant)",
              evaluations=0)
RECIPES = {r.name: r for r in (FAST_CPU, GPU, PAPER, NONE)}

# The fields' values when neither the user nor the recipe sets them (TrainConfig keeps them None: "unset").
DEFAULTS = dict(model="rtdetr_lite", epochs=50, batch_size=4, lr=1e-4, lr_backbone=1e-5, crop=True, eval_every=1,
                num_workers=2, warmup_steps=0, ema=False, ema_decay=0.9997, ema_warmup=2000)


def recipe_name(value: str | bool | None, device: torch.device | str) -> str:
    """The recipe ``value`` means on ``device``: ``auto`` -> fast-cpu / gpu, old configs' true / false -> paper /
    none; an unknown name raises :class:`RecipeError` listing the recipes."""
    if value is True or value in ("true", "True"):
        return "paper"
    if value is False or value in ("false", "False"):
        return "none"
    if value in (None, "auto"):
        return "gpu" if torch.device(device).type == "cuda" else "fast-cpu"
    if value not in RECIPES:
        raise RecipeError(f"unknown recipe {value!r}; the recipes are: auto, {', '.join(RECIPES)} "
                          "(detrkit recipes lists what each sets)")
    return value


def _misfit(model: str, key: str, value) -> str | None:
    """Why preset ``model`` cannot take the model setting ``key`` = ``value`` (None when it can): the model is
    built on the meta device (no memory, no init cost worth counting) with it."""
    try:
        with torch.device("meta"):
            if key == "class_loss":
                build_criterion(model_info(model).builder(num_classes=2), class_loss=value)
            else:
                model_info(model).builder(num_classes=2, **{key: value})
    except (TypeError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def _few(presets: list[str]) -> str:
    """The lite presets of a list (what a recipe for small data is meant for), and how many others: the zoo has
    dozens, a message names a handful."""
    lite = [p for p in presets if p.endswith("_lite")] or presets[:3]
    rest = len(presets) - len(lite)
    return ", ".join(lite) + (f" and {rest} more (`detrkit models`)" if rest else "")


def _fitting_model_settings(recipe: Recipe, model: str, explicit: bool) -> tuple[dict, list[str]]:
    """(the recipe's class_loss / model_args that fit ``model``, notes about those that do not). With an explicit
    recipe a misfit is a :class:`RecipeError`."""
    settings = {"class_loss": recipe.model_settings.get("class_loss"), **recipe.model_settings.get("model_args", {})}
    settings = {k: v for k, v in settings.items() if v is not None}
    if model == recipe.settings.get("model"):
        return settings, []
    misfits = {k: why for k, v in settings.items() if (why := _misfit(model, k, v)) is not None}
    if misfits and explicit:
        lines = []
        for key, why in misfits.items():
            takers = [m for m in list_models() if _misfit(m, key, settings[key]) is None]
            lines.append(f"{key}={settings[key]!r} ({why}); presets that take it: {_few(takers)}")
        raise RecipeError(f"recipe {recipe.name} does not fit {model}: " + "; ".join(lines)
                          + ". Choose one of those presets, --recipe none, or override the setting "
                            "(--class_loss / --model_args)")
    notes = [f"{k}={settings[k]!r} left out ({why})" for k, why in misfits.items()]
    return {k: v for k, v in settings.items() if k not in misfits}, notes


def dataset_stats(cfg: TrainConfig) -> dict:
    """Number of training images, median longer image side and median box side (sqrt of its area), in pixels."""
    _, ann, _ = dataset_split(cfg, "train")
    coco = ann if isinstance(ann, dict) else load_coco_json(ann)
    images = coco["images"][: cfg.max_train_images] if cfg.max_train_images else coco["images"]
    kept = {img["id"] for img in images}
    sides = [max(img.get("width") or 0, img.get("height") or 0) for img in images]
    boxes = [math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco.get("annotations", [])
             if a.get("image_id") in kept and a.get("bbox") and len(a["bbox"]) == 4 and min(a["bbox"][2:]) > 0]
    return {"images": len(images), "image_side": statistics.median([s for s in sides if s] or [0]),
            "box_side": statistics.median(boxes) if boxes else 0.0}


def sized_image(recipe: Recipe, stats: dict) -> int:
    """The training size for a dataset: its images' longer side, at most ``base_size``; larger (up to
    ``max_size``) where the median box would shrink below ``min_object`` px; a multiple of 32."""
    side = stats["image_side"] or recipe.base_size
    size = min(side, recipe.base_size)
    if stats["box_side"] and stats["box_side"] * size / side < recipe.min_object:
        size = min(recipe.max_size, side * recipe.min_object / stats["box_side"])
    return max(64, int(round(size / 32)) * 32)


def sized_epochs(recipe: Recipe, images: int, image_size: int) -> int:
    """Epochs that spend the recipe's budget of pixels on ``images`` training images at ``image_size``."""
    return max(1, round(recipe.pixels_seen / (max(1, images) * image_size**2)))


@dataclass
class ResolvedRecipe:
    """The config a recipe resolved to, and the one line that says what was chosen and why."""

    config: TrainConfig
    recipe: Recipe
    message: str


def resolve_recipe(cfg: TrainConfig, device: torch.device | str = "cpu") -> ResolvedRecipe:
    """Fill ``cfg``'s unset fields from its recipe (see the module docstring). Idempotent: a resolved config
    (every field set) resolves to itself, so a run's saved config.yaml repeats the run."""
    name = recipe_name(cfg.recipe, device)
    explicit = cfg.recipe not in (None, "auto")
    recipe = RECIPES[name]
    fill: dict = {}
    if name == "paper":
        model = cfg.model or DEFAULTS["model"]
        paper = model_info(model).recipe
        if paper is None:
            with_paper = [m for m in list_models() if model_info(m).recipe]
            raise RecipeError(f"{model} has no paper recipe (the lite presets are ours): give --model one of "
                              f"{', '.join(with_paper)}, or another recipe")
        # the paper's schedule is the point of this recipe: it overrides epochs / lr as --recipe true always did
        cfg = replace(cfg, **paper)
    for key, value in recipe.settings.items():
        if getattr(cfg, key) is None:
            fill[key] = value
    model = cfg.model or fill.get("model") or DEFAULTS["model"]
    notes: list[str] = []
    if recipe.model_settings:
        settings, notes = _fitting_model_settings(recipe, model, explicit)
        if cfg.class_loss is None and "class_loss" in settings:
            fill["class_loss"] = settings.pop("class_loss")
        settings.pop("class_loss", None)
        fill["model_args"] = {**settings, **cfg.model_args}  # the user's keys win
    if recipe.network and model == recipe.settings.get("model"):
        fill["model_args"] = {**recipe.network, **fill.get("model_args", cfg.model_args)}
    sized = []
    if recipe.pixels_seen is not None and (cfg.image_size is None or cfg.epochs is None):
        stats = dataset_stats(cfg)
        if cfg.image_size is None:
            fill["image_size"] = sized_image(recipe, stats)
            side, box = stats["image_side"], stats["box_side"]
            sized.append(f"{fill['image_size']} px (images {side:.0f} px, boxes {box:.0f})")
        if cfg.epochs is None:
            fill["epochs"] = sized_epochs(recipe, stats["images"], cfg.image_size or fill["image_size"])
            sized.append(f"{fill['epochs']} epochs of {stats['images']} images")
    epochs = cfg.epochs or fill.get("epochs") or DEFAULTS["epochs"]
    if recipe.pixels_seen is not None and cfg.lr_drop is None:
        fill["lr_drop"] = epochs  # still learning fastest at the end of the budget: no drop (demo_recipe.json)
    if recipe.evaluations and cfg.eval_every is None:
        fill["eval_every"] = max(1, math.ceil(epochs / recipe.evaluations))
    resolved = replace(cfg, **fill, recipe=name)
    resolved = replace(resolved, **{k: v for k, v in DEFAULTS.items() if getattr(resolved, k) is None})
    why = "chosen for this device" if not explicit else "as asked"
    parts = [f"recipe {name} ({why}): {recipe.summary}", f"model {resolved.model}"]
    if sized:
        parts.append("sized from the dataset: " + ", ".join(sized))
    parts += notes
    return ResolvedRecipe(resolved, recipe, "; ".join(parts))


def describe_recipes() -> str:
    """The table ``detrkit recipes`` prints: each recipe, what it is for and what it sets."""
    lines = []
    for r in RECIPES.values():
        lines.append(f"{r.name}: {r.summary}")
        sets = {**r.settings, **r.model_settings}
        if sets:
            lines.append("    sets " + ", ".join(f"{k}={v}" for k, v in sets.items()))
        if r.network:
            lines.append(f"    {r.settings['model']}'s network: " + ", ".join(f"{k}={v}" for k, v in r.network.items())
                         + " (other presets keep their own)")
        if r.pixels_seen:
            lines.append(f"    image size: the images' side up to {r.base_size} (up to {r.max_size} where the median "
                         f"box would be under {r.min_object:.0f} px), a multiple of 32; epochs: "
                         f"{r.pixels_seen / 224**2:.0f} images at 224 px (fewer at a larger size); no lr drop; "
                         f"{r.evaluations} evaluations")
        if r.evidence:
            lines.append(f"    measured: {r.evidence}")
    lines.append("auto (the default): fast-cpu on a CPU, gpu on a CUDA device. Every explicit option overrides "
                 "the recipe's value.")
    return "\n".join(lines)

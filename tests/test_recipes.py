"""Named recipes: what `detrkit train --data DIR` trains with no other option, and how explicit options win."""

import json

import pytest
from conftest import TINY

from detrkit.cli import main
from detrkit.engine.config import TrainConfig
from detrkit.engine.recipes import FAST_CPU, RecipeError, resolve_recipe, sized_epochs, sized_image
from detrkit.engine.train import train


def test_auto_on_a_cpu_is_fast_cpu_with_a_schedule_sized_from_the_dataset(synth_dir):
    resolved = resolve_recipe(TrainConfig(data=str(synth_dir)), "cpu")
    cfg = resolved.config
    assert cfg.recipe == "fast-cpu" and cfg.model == "rtdetr_lite"
    assert (cfg.batch_size, cfg.lr, cfg.lr_backbone, cfg.crop, cfg.class_loss) == (2, 3e-4, 3e-4, False, "mal")
    assert cfg.model_args == {"query_nms": 0.5, "denoising": {"num_dn_pairs": 50}, "backbone_stem": "7x7"}
    assert (cfg.ema, cfg.ema_decay, cfg.ema_warmup) == (True, 0.99, 50)  # a ~100-step average (ema_paired.json)
    # 12 images of ~128 px: the images' own size (a multiple of 32), and the demo's budget of pixels in epochs
    assert cfg.image_size == 128 and cfg.epochs == round(3 * 800 * 224**2 / (12 * 128**2)) and cfg.lr_drop == cfg.epochs
    assert "fast-cpu" in resolved.message and "rtdetr_lite" in resolved.message and "12 images" in resolved.message
    assert resolve_recipe(TrainConfig(data=str(synth_dir)), "cuda").config.recipe == "gpu"


def test_the_demos_dataset_gets_the_demos_schedule():
    """800 images of 224 px with boxes of the demo's size: 224 px, 3 epochs, as the demo was tuned."""
    assert sized_image(FAST_CPU, {"image_side": 224, "box_side": 40}) == 224
    assert sized_epochs(FAST_CPU, 800, 224) == 3
    # larger photos are trained at the base size while their objects stay >= 16 px there ...
    assert sized_image(FAST_CPU, {"image_side": 400, "box_side": 37}) == 224
    # ... and larger where they would not (capped); small images are not upsampled for big objects
    assert sized_image(FAST_CPU, {"image_side": 400, "box_side": 20}) == 320
    assert sized_image(FAST_CPU, {"image_side": 1000, "box_side": 10}) == 448
    assert sized_image(FAST_CPU, {"image_side": 130, "box_side": 50}) == 128
    assert sized_epochs(FAST_CPU, 800, 448) == 1 and sized_epochs(FAST_CPU, 40, 224) == 60


def test_every_explicit_option_overrides_the_recipe(synth_dir):
    cfg = resolve_recipe(TrainConfig(data=str(synth_dir), lr=1e-3, epochs=2, image_size=96, batch_size=3,
                                     crop=True, class_loss="varifocal", model_args={"query_nms": None}), "cpu").config
    assert (cfg.lr, cfg.epochs, cfg.image_size, cfg.batch_size, cfg.crop, cfg.class_loss) == (
        1e-3, 2, 96, 3, True, "varifocal")
    assert cfg.model_args == {"query_nms": None, "denoising": {"num_dn_pairs": 50}, "backbone_stem": "7x7"}
    assert cfg.lr_backbone == 3e-4
    assert resolve_recipe(TrainConfig(data=str(synth_dir), ema=False), "cpu").config.ema is False


def test_a_resolved_config_resolves_to_itself(synth_dir):
    """config.yaml holds the resolved config: re-running it repeats the run."""
    once = resolve_recipe(TrainConfig(data=str(synth_dir)), "cpu").config
    assert resolve_recipe(once, "cpu").config == once


def test_old_configs_keep_their_meaning(synth_dir):
    """recipe: false (every config written before recipes) trains exactly the options given; true = paper."""
    old = resolve_recipe(TrainConfig(data=str(synth_dir), recipe=False, model="detr_lite", epochs=5), "cpu").config
    assert (old.recipe, old.model, old.epochs, old.lr, old.batch_size, old.crop, old.class_loss) == (
        "none", "detr_lite", 5, 1e-4, 4, True, None)
    assert old.model_args == {} and old.lr_drop is None and old.image_size is None
    assert (old.ema, old.ema_decay, old.ema_warmup) == (False, 0.9997, 2000)
    paper = resolve_recipe(TrainConfig(model="dino_r50_4scale", epochs=3, lr=5e-4, batch_size=7, recipe=True)).config
    assert (paper.epochs, paper.lr, paper.lr_backbone, paper.lr_drop, paper.batch_size) == (12, 1e-4, 1e-5, 11, 7)
    with pytest.raises(RecipeError, match="no paper recipe.*dino_r50_4scale"):
        resolve_recipe(TrainConfig(model="dino_lite", recipe="paper"))


def test_bad_recipes_say_what_to_do(synth_dir):
    with pytest.raises(RecipeError, match="unknown recipe 'fast'.*fast-cpu, gpu, paper, none"):
        resolve_recipe(TrainConfig(data=str(synth_dir), recipe="fast"))
    # an explicit recipe whose settings a preset does not take: the setting, why, and the presets that take it
    with pytest.raises(RecipeError, match=r"does not fit detr_lite: class_loss='mal'.*query_nms=0.5 .*presets that "
                                          r"take it: dfine_lite, dino_lite, rtdetr_lite and \d+ more \(`detrkit "
                                          r"models`\);"):
        resolve_recipe(TrainConfig(data=str(synth_dir), recipe="fast-cpu", model="detr_lite"))
    # the automatic choice keeps what fits and says what it left out
    auto = resolve_recipe(TrainConfig(data=str(synth_dir), model="detr_lite"))
    assert auto.config.class_loss is None and auto.config.model_args == {} and auto.config.lr == 3e-4
    assert "query_nms=0.5 left out" in auto.message
    # another preset the settings fit takes them
    dino = resolve_recipe(TrainConfig(data=str(synth_dir), recipe="fast-cpu", model="dino_lite")).config
    assert dino.class_loss == "mal" and dino.model_args["query_nms"] == 0.5
    assert "backbone_stem" not in dino.model_args  # rtdetr_lite's network only: dino_lite keeps its own


def test_cli_lists_the_recipes_and_rejects_an_unknown_one(synth_dir, tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("fast-cpu", "gpu", "paper", "none", "auto"):
        assert f"{name}" in out
    assert "query_nms" in out and "batch_size=16" in out and "rtdetr_lite's network: backbone_stem=7x7" in out
    assert main(["train", "--data", str(synth_dir), "--output_dir", str(tmp_path / "r"), "--recipe", "nope",
                 "--progress", "false"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_time_limit_stops_training_evaluates_and_saves(synth_dir, tmp_path):
    base = dict(recipe="none", model="detr_lite", data=str(synth_dir), model_args=dict(TINY), image_size=64,
                batch_size=2, num_workers=0, progress=False, plots=False, tensorboard=False, epochs=3, log_every=1)
    stopped = train(TrainConfig(**base, output_dir=str(tmp_path / "limited"), time_limit=1e-6))
    full = train(TrainConfig(**base, output_dir=str(tmp_path / "full")))
    steps = [json.loads(x) for x in (tmp_path / "limited" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and stopped["epoch"] == 0 and "AP50" in stopped  # one step, then evaluated
    assert (tmp_path / "limited" / "checkpoints" / "step_00000001" / "model.safetensors").is_file()
    last = json.loads((tmp_path / "limited" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 1 and "val_AP" in last
    # the negative control: without the limit, every step of the 3 epochs
    assert len((tmp_path / "full" / "steps.jsonl").read_text().splitlines()) == 3 * 6 and full["epoch"] == 3

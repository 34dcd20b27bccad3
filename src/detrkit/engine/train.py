"""The training loop: AdamW with warm-up and a step / multistep / cosine schedule, AMP on GPU (a loss scaler for
fp16, none for bf16), gradient clipping and accumulation, an EMA of the weights, DDP through torchrun, a progress
bar, JSONL logs, periodic COCO evaluation, atomic checkpoints (last N + best) and exact ``--resume``, and a guard
that skips non-finite steps and stops after too many in a row."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import detrkit.runtime as runtime
from detrkit.data import collate
from detrkit.data.sampler import EpochSampler, SeededSamples
from detrkit.engine import distributed as D
from detrkit.engine.checkpoint import (
    latest_checkpoint,
    load_state,
    save_checkpoint,
    save_step_checkpoint,
    truncate_log,
)
from detrkit.engine.config import TrainConfig, build_datasets, write_val_split
from detrkit.engine.ema import ModelEMA
from detrkit.engine.evaluate import evaluate, format_metrics, format_per_class, write_metrics
from detrkit.engine.plots import plot_batch, plot_labels, plot_training_curves
from detrkit.engine.recipes import RecipeError, resolve_recipe
from detrkit.engine.schedule import LRSchedule
from detrkit.engine.tracking import TensorBoardLogger
from detrkit.losses import build_criterion
from detrkit.registry import image_size_of, model_info, preprocess_of
from detrkit.runtime import amp_dtype, resolve_device
from detrkit.weights.files import CheckpointError, read_meta, step_checkpoints
from detrkit.weights.formats import load_pretrained, load_weights
from detrkit.weights.hub import resolve_weights


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says what to do."""


def param_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """The backbone trains at ``lr_backbone``; parameters named in ``model.slow_params`` (Deformable DETR's
    sampling offsets and reference points) at ``model.slow_lr_factor * lr``; everything else at ``lr``."""
    slow_names, slow_factor = getattr(model, "slow_params", ()), getattr(model, "slow_lr_factor", 1.0)
    groups = {"rest": [], "backbone": [], "slow": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "backbone" if name.startswith("backbone.") else "slow" if any(s in name for s in slow_names) else "rest"
        groups[key].append(p)
    return [{"params": groups["rest"], "lr": lr}, {"params": groups["backbone"], "lr": lr_backbone},
            {"params": groups["slow"], "lr": lr * slow_factor}]


def adamw(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, as its fused kernel where this torch has one for the parameters' device (CUDA; CPU from torch 2.4):
    one pass over all the parameters instead of a loop of small ops per tensor. The same update; on the demo's
    rtdetr_lite (278 tensors, 2 CPU cores) 9 ms a step instead of 81 ms (the loop)."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch: the loop
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run described by a :class:`TrainConfig`; ``Trainer(cfg).fit()`` returns the final metrics.

    Under ``torchrun`` every process builds the same Trainer: each trains on its shard of every batch
    (``batch_size`` images per process), DDP averages the gradients, and rank 0 alone writes logs and
    checkpoints and shows progress.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.dist = D.init_distributed(cfg.device)
        self.main = self.dist.is_main
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        try:
            resolved = resolve_recipe(cfg, self.device)
        except RecipeError as e:
            raise TrainingError(f"--recipe: {e}") from None
        if self.main and cfg.progress:
            tqdm.write(resolved.message)
        self.cfg = cfg = resolved.config
        seed_everything(cfg.seed + self.dist.rank)
        self.amp_dtype = amp_dtype(cfg.amp, self.device, training=True)
        if self.main and cfg.progress and self.device.type == "cpu" and cfg.amp == "auto" and self.amp_dtype:
            tqdm.write("bf16 autocast: this CPU computes bf16 natively (--amp none trains in fp32)")
        if self.main and self.device.type == "cpu" and cfg.amp == "bf16" and not runtime.cpu_has_bf16():
            warnings.warn("--amp bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): autocast emulates it, and a "
                          "training step runs ~10x slower than in fp32 (--amp auto or none trains in fp32 "
                          "here)", stacklevel=2)
        if self.main and self.device.type == "cpu" and cfg.amp == "fp16":
            warnings.warn("--amp fp16 is CUDA's: this CPU run trains in fp32 (--amp bf16 for bf16 autocast on a CPU)",
                          stacklevel=2)
        self.out = Path(cfg.output_dir)
        self.resuming = self._resumable(cfg.resume) if cfg.resume else None
        if self.resuming is not None:
            self.cfg = cfg = self._saved_network(cfg, resolved.recipe.network, self.resuming[0])
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        self.train_set, self.val_set = build_datasets(cfg, progress=self.main)
        if cfg.plots and self.main:  # what the boxes of the training split look like
            plot_labels(self.train_set.coco, self.out / "labels.png")
        if cfg.val_split and self.main:
            write_val_split(cfg, [img["id"] for img in self.val_set.coco["images"]], self.out / "val_split.json")
        self._build_loaders()
        self._build_model()
        self.optimizer = adamw(param_groups(self.model, cfg.lr, cfg.lr_backbone), cfg.weight_decay)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.steps_per_epoch = -(-self.batches_per_epoch // cfg.accumulate)
        self.schedule = LRSchedule(
            cfg.lr_schedule,
            self.steps_per_epoch,
            cfg.epochs * self.steps_per_epoch,
            warmup_steps=cfg.warmup_steps,
            milestones=tuple(cfg.lr_milestones),
            lr_drop=cfg.lr_drop if cfg.lr_drop is not None else max(1, round(cfg.epochs * 2 / 3)),
            gamma=cfg.lr_gamma,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_end=cfg.aug_stop_epoch,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)  # bf16: none
        # where the run is: epochs done, batches of the current epoch done, optimizer steps done
        self.epoch, self.batch, self.step, self.best_ap, self.bad_steps, self.running = 0, 0, 0, -1.0, 0, {}
        self.evals_without_gain = 0  # early stopping (--patience)
        self.meta = {
            "model": cfg.model, "num_classes": self.train_set.num_classes,
            "model_args": {k: v for k, v in self.model_args.items() if k != "pretrained_backbone"},
            "class_names": self.train_set.class_names, "label_to_cat": self.train_set.label_to_cat,
            "image_size": cfg.image_size or image_size_of(cfg.model),
        }
        if cfg.resume:
            self._resume(cfg.resume)
        self._set_lr()
        self.tb = TensorBoardLogger(self.out / "tensorboard", cfg.tensorboard and self.main)

    # -- set-up ------------------------------------------------------------------------------------
    def _build_loaders(self) -> None:
        cfg, d = self.cfg, self.dist
        train = (
            self.train_set
            if cfg.max_train_images is None
            else Subset(self.train_set, range(min(cfg.max_train_images, len(self.train_set))))
        )
        val = (
            self.val_set
            if cfg.max_val_images is None
            else Subset(self.val_set, range(min(cfg.max_val_images, len(self.val_set))))
        )
        self.train_sampler = EpochSampler(len(train), shuffle=True, seed=cfg.seed, rank=d.rank, world_size=d.world_size)
        per_rank = len(self.train_sampler)
        drop_last = per_rank >= cfg.batch_size
        self.batches_per_epoch = per_rank // cfg.batch_size if drop_last else -(-per_rank // cfg.batch_size)
        # the loaders get their own generator: making an iterator draws from it, never from the global RNG
        # that dropout and denoising use (that one is checkpointed and must see the same draws after a resume)
        args = dict(
            batch_size=cfg.batch_size,
            collate_fn=collate,
            num_workers=cfg.num_workers,
            generator=torch.Generator(),
            persistent_workers=cfg.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        self.train_loader = DataLoader(
            SeededSamples(train, cfg.seed), sampler=self.train_sampler, drop_last=drop_last, **args
        )
        val_sampler = EpochSampler(len(val), shuffle=False, rank=d.rank, world_size=d.world_size)
        self.val_loader = DataLoader(SeededSamples(val, cfg.seed), sampler=val_sampler, **args)

    def _build_model(self) -> None:
        cfg, model_args = self.cfg, dict(self.cfg.model_args)
        if cfg.weights:  # fine-tuning: the layout may imply builder settings (detrex DINO), which the checkpoints keep
            model, loaded = load_pretrained(cfg.model, resolve_weights(cfg.model, cfg.weights, **model_args),
                                            num_classes=self.train_set.num_classes, **model_args)
            model_args = loaded["model_args"]
        else:
            try:
                model = model_info(cfg.model).builder(num_classes=self.train_set.num_classes, **model_args)
            except (TypeError, ValueError) as e:  # a setting the builder does not take, or a value out of range
                raise TrainingError(f"--model_args {model_args} do not fit {cfg.model}: {e}") from None
        self.model_args = model_args
        model.to(self.device)
        # channels-last convolutions: ~20% faster backbone steps on CPU (oneDNN) and with AMP on GPU
        model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.model = model  # the plain module: what is saved and evaluated
        self.ema = ModelEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.ddp = None
        if self.dist.enabled:
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        wrapped = self.ddp or model
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.eval_model = self.forward_model if cfg.compile and not self.dist.enabled else model
        losses = {"class_loss": cfg.class_loss} if cfg.class_loss else {}
        try:
            self.criterion = build_criterion(model, **losses).to(self.device)
        except ValueError as e:
            raise TrainingError(f"--class_loss: {e}") from None

    @property
    def step_lr(self) -> float:
        """The (first group's) learning rate of the latest optimizer step: what the progress bar and the logs
        show. The optimizer already holds the next step's, which differs after the last step before a drop."""
        return self.optimizer.param_groups[0]["initial_lr"] * self.schedule(max(0, self.step - 1))

    def _set_lr(self) -> None:
        factor = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
        }
        state = {
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "best_ap": self.best_ap,
            "bad_steps": self.bad_steps, "running": dict(self.running), "evals_without_gain": self.evals_without_gain,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": D.gather_objects(rng), "world_size": self.dist.world_size, "config": json.dumps(asdict(self.cfg)),
        }
        if self.ema is not None:  # model.safetensors holds the average; the raw weights resume training
            state["model"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            state["ema_updates"] = self.ema.updates
        return state

    def _save(self) -> None:
        """A resumable checkpoint of where the run is now (collective: every process calls it)."""
        state = self._state()
        saved = self.ema.module if self.ema is not None else self.model
        if not torch.stack([torch.isfinite(p).all() for p in saved.parameters()]).all():  # one sync, not one per tensor
            if self.main:
                warnings.warn(f"step {self.step}: the weights hold NaN / inf; not saving them over the last good "
                              "checkpoint", stacklevel=2)
            return
        if self.main:
            save_step_checkpoint(self.out, self.step, saved, self.meta, state, keep=self.cfg.keep_checkpoints)
        D.barrier()

    @staticmethod
    def _saved_network(cfg: TrainConfig, network: dict, path: Path) -> TrainConfig:
        """A run resumes with the network its checkpoint holds: the builder settings a recipe's ``network`` sets
        (e.g. the stem) are the checkpoint's, even where it was saved before the recipe set them."""
        saved = read_meta(path).get("model_args", {})
        args = {k: v for k, v in cfg.model_args.items() if k not in network}
        args |= {k: saved[k] for k in network if k in saved}
        return replace(cfg, model_args=args) if args != cfg.model_args else cfg

    def _resume(self, where: str) -> None:
        found = self.resuming
        if found is None:  # `--resume last` before the first checkpoint was written: start over
            if self.main:
                warnings.warn(f"--resume {where}: {self.out} has no checkpoint yet; training starts from the beginning",
                              stacklevel=3)
                truncate_log(self.out / "metrics.jsonl", "epoch", 0)
                truncate_log(self.out / "steps.jsonl", "step", 0)
            return
        path, state = found
        if self.ema is not None and "model" in state:
            load_weights(self.ema.module, path)
            self.model.load_state_dict(state["model"])
            self.ema.updates = int(state["ema_updates"])
        else:
            load_weights(self.model, path)
            if self.ema is not None:  # EMA switched on for the resumed part: start it from the weights
                self.ema = ModelEMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            torch.set_rng_state(rng[self.dist.rank]["torch"])
            if rng[self.dist.rank]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[self.dist.rank]["cuda"])
        elif self.main:
            warnings.warn(f"{path} was saved by {len(rng)} processes and resumes on {self.dist.world_size}: the data "
                          "order is the same, dropout / denoising noise will differ", stacklevel=2)
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.best_ap, self.bad_steps, self.running = (
            float(state["best_ap"]),
            int(state["bad_steps"]),
            dict(state["running"]),
        )
        self.evals_without_gain = int(state.get("evals_without_gain", 0))
        if self.main:
            truncate_log(self.out / "metrics.jsonl", "epoch", self.epoch)
            truncate_log(self.out / "steps.jsonl", "step", self.step)
            tqdm.write(f"resumed from {path} at epoch {self.epoch + 1}, batch {self.batch}, step {self.step}")

    def _resumable(self, where: str) -> tuple[Path, dict] | None:
        """The checkpoint to resume and its state: ``where``, or the run's newest that reads back (a file
        damaged after its write, e.g. by a full disk, is reported and the one before it used); None when the
        run has no checkpoint yet (so that a job script can always pass ``--resume last``)."""
        if where not in ("last", "true", "True"):
            return Path(where), load_state(where)
        candidates = step_checkpoints(self.out)
        for path in reversed(candidates):
            try:
                state = load_state(path)
                read_meta(path)
                return path, state
            except Exception as e:  # noqa: BLE001 - any damage: try the previous one
                if self.main:
                    warnings.warn(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); trying the one before it",
                                  stacklevel=3)
        if not candidates:
            return None
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {self.out / 'checkpoints'} can be read "
                              "(see the warnings); start the run again without --resume.")

    def _log(self, name: str, record: dict) -> None:
        if self.main:
            with open(self.out / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        self.started, self.images_seen, self.batches_run, self.timed_out = time.perf_counter(), 0, 0, False
        try:
            while self.epoch < cfg.epochs:
                self._train_epoch()
                if self.timed_out:  # --time_limit: evaluate and save the model as it is, mid-epoch or not
                    if self.main:
                        tqdm.write(f"time limit of {cfg.time_limit:g} min reached at step {self.step} (epoch "
                                   f"{self.epoch + 1}, batch {self.batch}/{self.batches_per_epoch})")
                    metrics = self._evaluate()
                    self._keep_best(metrics)
                    self._log("metrics.jsonl", {"epoch": self.epoch + self.batch / self.batches_per_epoch,
                                                "step": self.step, "lr": self.step_lr,
                                                "time": time.perf_counter() - self.started,
                                                **{f"val_{k}": v for k, v in metrics.items()}})
                    self._save()
                    break
                self.epoch, self.batch = self.epoch + 1, 0
                record = {"epoch": self.epoch, "step": self.step,
                          **{k: v / max(1, self.batches_per_epoch) for k, v in self.running.items()},
                          "lr": self.step_lr, "time": time.perf_counter() - self.started}
                self.running = {}
                if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    metrics = self._evaluate()
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                    if self.main:
                        tqdm.write(f"epoch {self.epoch}: loss {record.get('loss', float('nan')):.3f}  "
                                   f"AP {100 * metrics['AP']:.2f}  AP50 {100 * metrics['AP50']:.2f}")
                    self._keep_best(metrics)
                self._log("metrics.jsonl", record)
                self.tb.scalars("epoch", record, self.step)
                self._save()
                if self._patience_spent():
                    break
            if not metrics:  # resumed after the last epoch: evaluate what we have
                metrics = self._evaluate()
        finally:
            D.cleanup()
        final = {
            **metrics,
            "epoch": self.epoch,
            "model": cfg.model,
            "best_AP": max(self.best_ap, 0.0),
            "train_time_s": round(time.perf_counter() - self.started, 1),
        }
        if self.main:
            write_metrics(final, self.out / "metrics.json")
            if cfg.plots:
                plot_training_curves(self.out / "metrics.jsonl", self.out / "training_curves.png")
            self.tb.close()
            print(format_per_class(metrics["per_class"]))
            print(format_metrics(metrics))
        return final

    def _evaluate(self) -> dict:
        """COCO AP on the val split (with ``--plots``, the PR curves, per-class AP and confusion matrix of this
        evaluation are written into the run folder), logged to TensorBoard."""
        model = self.ema.module if self.ema is not None else self.eval_model
        metrics = evaluate(model, self.val_loader, self.val_set, self.device, amp_dtype=self.amp_dtype,
                           progress=self.cfg.progress and self.main,
                           report_dir=self.out if self.cfg.plots and self.main else None)
        if self.tb.writer is not None:
            self.tb.evaluation(metrics, self.step)
            batch = next(iter(self.val_loader)).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                self.tb.predictions(model, batch, self.val_set.class_names, self.step)
        return metrics

    def _keep_best(self, metrics: dict) -> None:
        if metrics["AP"] > self.best_ap:
            self.best_ap, self.evals_without_gain = metrics["AP"], 0
            if self.main:
                saved = self.ema.module if self.ema is not None else self.model
                save_checkpoint(self.out / "checkpoints" / "best", saved, {**self.meta, "metrics": metrics})
        else:
            self.evals_without_gain += 1

    def _patience_spent(self) -> bool:
        """Early stopping: ``patience`` evaluations in a row without a better val AP."""
        patience = self.cfg.patience
        if patience is None or self.evals_without_gain < patience or self.epoch >= self.cfg.epochs:
            return False
        if self.main:
            tqdm.write(f"early stopping after epoch {self.epoch}: val AP has not improved for {patience} evaluations "
                       f"(best {100 * self.best_ap:.2f}, kept in {self.out / 'checkpoints' / 'best'})")
        return True

    def _train_epoch(self) -> None:
        cfg = self.cfg
        self.model.train()
        self.train_sampler.set_epoch(self.epoch, start=self.batch * cfg.batch_size)
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and self.main),
            unit="batch",
            dynamic_ncols=True,
            initial=self.batch,
            total=self.batches_per_epoch,
        )
        total_batches = cfg.epochs * self.batches_per_epoch
        for batch in bar:
            batch = batch.to(self.device, non_blocking=True)
            if self.device.type == "cuda":  # NHWC convolutions for the tensor cores; on CPU (oneDNN) 4% slower
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            if self.step == 0 and self.batch == 0 and cfg.plots and self.main:  # what the model is fed, at the start
                plot_batch(batch.images, batch.padding_mask, batch.targets, self.train_set.class_names,
                           self.out / "train_batch.png", preprocess=preprocess_of(cfg.model))
            losses, stepped = self._train_step(batch, self.batch)
            self.batch, self.images_seen, self.batches_run = (
                self.batch + 1,
                self.images_seen + len(batch),
                self.batches_run + 1,
            )
            for k, v in losses.items():
                self.running[k] = self.running.get(k, 0.0) + v
            elapsed = time.perf_counter() - self.started
            left = total_batches - (self.epoch * self.batches_per_epoch + self.batch)
            bar.set_postfix(
                loss=f"{losses.get('loss', float('nan')):.3f}",
                lr=f"{self.step_lr:.1e}",
                img_s=f"{self.images_seen * self.dist.world_size / elapsed:.1f}",
                eta=_fmt_time(elapsed / self.batches_run * left),
            )
            if stepped and cfg.log_every and self.step % cfg.log_every == 0:
                self._log("steps.jsonl", {"step": self.step, "epoch": self.epoch + 1, "batch": self.batch, **losses,
                                          "lr": self.step_lr})
                self.tb.scalars("train", {**losses, "lr": self.step_lr,
                                          "images_per_s": self.images_seen * self.dist.world_size / elapsed}, self.step)
            if (
                stepped
                and cfg.checkpoint_every
                and self.step % cfg.checkpoint_every == 0
                and self.batch < self.batches_per_epoch
            ):
                self._save()
            if stepped and self._out_of_time():
                break

    def _out_of_time(self) -> bool:
        """``time_limit`` minutes of training spent (the same answer on every process)."""
        limit = self.cfg.time_limit
        if limit is None:
            return False
        self.timed_out = D.any_true(time.perf_counter() - self.started >= 60 * limit, self.device)
        return self.timed_out

    def _train_step(self, batch, index: int) -> tuple[dict[str, float], bool]:
        """Forward and backward one batch; an optimizer step after every ``accumulate`` batches.
        Returns (the batch's losses, whether the optimizer stepped)."""
        cfg = self.cfg
        last_micro = (index + 1) % cfg.accumulate == 0 or index + 1 == self.batches_per_epoch
        no_sync = self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.forward_model(batch.images, batch.padding_mask, batch.targets)
            try:
                losses = self.criterion(outputs, batch.targets)
                loss = sum(losses.values())
                finite = bool(torch.isfinite(loss))
            except FloatingPointError:  # the matcher refuses NaN / inf predictions (a diverged model)
                finite = False
            if D.any_true(not finite, self.device):  # every process skips together
                self._bad_step("loss", batch, index)
                return {}, False
            self.scaler.scale(loss / cfg.accumulate).backward()
        logged = {k: v for k, v in losses.items() if "_aux" not in k}
        values = D.all_reduce_mean(torch.stack([loss.detach(), *(v.detach() for v in logged.values())]))
        values = dict(
            zip(["loss", *logged], values.tolist(), strict=False)
        )  # one host transfer; the global batch's losses
        if not last_micro:
            return values, False
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.clip_max_norm if cfg.clip_max_norm > 0 else math.inf
        )
        if not self.scaler.is_enabled() and not torch.isfinite(norm):  # (fp16's scaler skips such steps itself)
            self._bad_step("gradient", batch, index)
            return values, False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.bad_steps = self.step + 1, 0
        self._set_lr()
        if self.ema is not None:
            self.ema.update(self.model)
        return values, True

    def _bad_step(self, what: str, batch, index: int) -> None:
        """Skip a step whose loss or gradient is not finite; stop after ``max_bad_steps`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        ids = [int(t["image_id"]) for t in batch.targets]
        if self.main:
            warnings.warn(
                f"non-finite {what} at step {self.step + 1} (epoch {self.epoch + 1}, batch {index}, image ids "
                f"{ids}); step skipped ({self.bad_steps} in a row)",
                stacklevel=3,
            )
        if self.bad_steps >= self.cfg.max_bad_steps:
            try:
                last = (f"the last good checkpoint, {latest_checkpoint(self.out)}, is intact: "
                        "resume from it (--resume last)")
            except Exception:
                last = "no checkpoint was written yet"
            raise TrainingError(f"{self.bad_steps} steps in a row had a non-finite {what} (the last at epoch "
                                f"{self.epoch + 1}, batch {index}, image ids {ids}); training stopped. {last} with a "
                                "lower --lr, a --warmup_steps ramp, --amp none or --clip_max_norm 0.1, and check the "
                                "data with `detrkit data check`.")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final validation metrics (also in ``output_dir/metrics.json``)."""
    return Trainer(cfg).fit()

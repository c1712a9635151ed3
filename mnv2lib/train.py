"""Training and evaluation: SGD with Nesterov momentum, one-cycle or cosine schedule,
label smoothing, mixed precision on CUDA, a checkpoint every epoch and exact resume.

Reproducibility: the data order and augmentation of epoch ``e`` come from a generator
seeded with ``(seed, e)``, and the checkpoint holds every other random state (torch's
global generator for dropout and the CrossNorm schedule's generator), so an interrupted
run resumed from its checkpoint ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import save_atomic
from .progress import progress

SCHEDULES = ("onecycle", "cosine")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run is stopped and marked failed."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    warmup_fraction: float = 0.15        # one-cycle: fraction of steps spent warming up
    augment: bool = True                  # random crop (4-pixel padding) + horizontal flip
    eval_batch_size: int = 500
    device: str = "auto"                  # auto | cpu | cuda | mps | cuda:N
    amp: bool = True                      # mixed precision, CUDA only
    channels_last: bool = False
    new_module_lr_mult: float = 1.0       # learning-rate factor for parameters not in the base model

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: got {self.schedule!r}; allowed values are {SCHEDULES}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}; allowed values are integers >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr: got {self.lr!r}; allowed values are numbers > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: got {self.label_smoothing!r}; allowed values are 0 <= x < 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _train_loader(dataset, batch_size: int, augment: bool, seed: int, device, channels_last: bool):
    from .data import BatchLoader

    # always shuffled; `augment` only switches the random crop + flip
    return BatchLoader(dataset.train_images, dataset.train_labels, batch_size=batch_size, train=True,
                       augment=augment, mean=dataset.mean, std=dataset.std, seed=seed, device=device,
                       channels_last=channels_last, drop_last=True)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, batch_size: int = 500,
             device: str | torch.device = "auto", channels_last: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on uint8 ``images`` (eval mode, no augmentation)."""
    from .data import BatchLoader

    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    loader = BatchLoader(images, labels, batch_size=batch_size, train=False, mean=mean, std=std, seed=0,
                         device=device, channels_last=channels_last, drop_last=False)
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        for x, y in loader:
            logits = model(x).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    model.train(was_training)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1), "count": count}


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Weight decay on conv/linear weights only; optional higher lr for modules added to the base model."""
    base_names = getattr(model, "base_parameter_names", None)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1
        new = base_names is not None and name not in base_names
        groups.setdefault((decay, new), []).append(p)
    return [
        {"params": params, "weight_decay": config.weight_decay if decay else 0.0,
         "lr_mult": config.new_module_lr_mult if new else 1.0}
        for (decay, new), params in groups.items()
    ]


def _make_optimizer(model, config: TrainConfig, steps_per_epoch: int):
    optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov)
    total = config.epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_fraction * total)) if config.schedule == "onecycle" else 0

    def factor(step: int) -> float:
        if step < warmup:  # linear warm-up from lr/25, as one-cycle
            return 0.04 + 0.96 * step / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, m=g["lr_mult"]: m * factor(s) for g in optimizer.param_groups])
    return optimizer, scheduler


@dataclass
class TrainResult:
    history: list[dict]
    seconds: float
    device: str
    resumed_from_epoch: int


def _rng_state(model) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    schedule = getattr(model, "crossnorm_schedule", None)
    if schedule is not None:
        state["crossnorm"] = schedule.generator.get_state()
    return state


def _set_rng_state(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    schedule = getattr(model, "crossnorm_schedule", None)
    if schedule is not None and "crossnorm" in state:
        schedule.generator.set_state(state["crossnorm"])


def train_model(model: nn.Module, dataset, config: TrainConfig = TrainConfig(), seed: int = 0,
                checkpoint_path: str | Path | None = None, show_progress: bool = True,
                on_epoch: Callable[[dict], None] | None = None, stop_after_epoch: int | None = None) -> TrainResult:
    """Train ``model`` on ``dataset`` (a :class:`mnv2lib.data.Dataset`); returns per-epoch metrics.

    With ``checkpoint_path`` a checkpoint is written after every epoch and an existing one
    is resumed. ``stop_after_epoch`` ends the call early (to test resume), as a kill would.
    """
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    schedule = getattr(model, "crossnorm_schedule", None)
    if schedule is not None:
        schedule.seed(seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: got {config.batch_size}, larger than the {len(dataset.train_labels)} "
                         "training images; allowed: at most the training-set size")
    optimizer, scheduler = _make_optimizer(model, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict] = []
    start_epoch, elapsed_before = 0, 0.0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state.get("config") not in (None, config.to_dict()):
            raise ValueError(f"checkpoint_path: {checkpoint_path} belongs to a run with another TrainConfig "
                             f"({state['config']}); allowed: a checkpoint of this config, or a new path")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(model, state["rng"])
        history, start_epoch, elapsed_before = state["history"], state["epoch"], state["seconds"]
    resumed_from = start_epoch
    t_start = time.perf_counter()
    epochs = progress(range(start_epoch, config.epochs), enabled=show_progress, desc="epochs", unit="epoch",
                      initial=start_epoch, total=config.epochs)
    for epoch in epochs:
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        loader = _train_loader(dataset, config.batch_size, config.augment, seed * 100_003 + epoch, device,
                               config.channels_last)
        for step, (x, y) in enumerate(progress(loader, enabled=show_progress, desc=f"epoch {epoch + 1}",
                                               leave=False, unit="batch")):
            with torch.autocast(device.type, enabled=scaler.is_enabled()):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                         "the run is stopped (try a lower lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
        train_seconds = time.perf_counter() - t0
        test = evaluate(model, dataset.test_images, dataset.test_labels, dataset.mean, dataset.std,
                        config.eval_batch_size, device, config.channels_last)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "test_accuracy": test["accuracy"], "test_loss": test["loss"], "epoch_seconds": train_seconds,
                  "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if checkpoint_path:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "rng": _rng_state(model), "config": config.to_dict(), "history": history, "epoch": epoch + 1,
                          "seconds": elapsed_before + time.perf_counter() - t_start}, checkpoint_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            break
    return TrainResult(history=history, seconds=elapsed_before + time.perf_counter() - t_start,
                       device=str(device), resumed_from_epoch=resumed_from)

"""Training and evaluation: SGD with Nesterov momentum, one-cycle or cosine schedule,
label smoothing, mixed precision on CUDA, a checkpoint every epoch and exact resume.

Reproducibility: the data order and augmentation of epoch ``e`` come from a generator
seeded with ``(seed, e)``, and the checkpoint holds every other random state (torch's
global generator for dropout and the CrossNorm schedule's generator), so an interrupted
run resumed from its checkpoint ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..utils.checks import check_bool, check_int, check_number
from ..utils.io import save_atomic
from ..utils.progress import progress

SCHEDULES = ("onecycle", "cosine")
AMP_DTYPES = ("bfloat16", "float16")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run is stopped and marked failed."""


class TrainingDivergedError(NonFiniteLossError):
    """The loss is finite but the run has diverged (see :func:`check_divergence`); marked failed too."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: unreadable, truncated, or of another model. The message names
    the file; ``run_experiment`` moves such a file aside and trains the run from the start."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


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
    amp_dtype: str = "bfloat16"           # bfloat16 (no loss scaling; float16 where bf16 is unsupported) | float16
    channels_last: bool = False
    new_module_lr_mult: float = 1.0       # learning-rate factor for parameters not in the base model
    # Short-budget recipe options (training-time choices: the model's default initialization stays
    # torchvision's). zero_init_residual: zero the scale of the last BN of every residual branch, so
    # each block starts as the identity. ema_decay: evaluate and keep an exponential moving average
    # of the weights (0 = off), its decay warmed up as min(decay, (1 + t) / (10 + t)).
    zero_init_residual: bool = False
    ema_decay: float = 0.0
    # learning-rate factor for the parameters without weight decay (BatchNorm scales and shifts, biases):
    # the speed-run recipes' higher normalisation lr; 1.0 (the default) leaves run keys as they were
    norm_lr_mult: float = 1.0
    compile: bool = False                 # torch.compile the training step's model (pays off on GPUs)
    # learning curve: the dataset's validation images evaluated at this many evenly spaced steps of the
    # run (0: none); evaluation only, the training is the same
    curve_points: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: got {self.schedule!r}; allowed values are {SCHEDULES}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        for name in ("nesterov", "augment", "amp", "channels_last"):
            check_bool(name, getattr(self, name))
        if self.nesterov and self.momentum == 0:
            raise ValueError("momentum: got 0 with nesterov=True; allowed: momentum > 0, or nesterov=False")
        check_number("weight_decay", self.weight_decay, 0)
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_number("warmup_fraction", self.warmup_fraction, 0, 1, high_open=True)
        check_number("new_module_lr_mult", self.new_module_lr_mult, 0, low_open=True)
        check_number("norm_lr_mult", self.norm_lr_mult, 0, 100, low_open=True)
        check_device_name(self.device)
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype: got {self.amp_dtype!r}; allowed values are {AMP_DTYPES}")
        for name in ("zero_init_residual", "compile"):
            check_bool(name, getattr(self, name))
        check_number("ema_decay", self.ema_decay, 0, 1, high_open=True)
        check_int("curve_points", self.curve_points, 0, 1000)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in _OMITTED_AT_DEFAULT.items():  # options added later: old runs keep their keys
            if d[name] == default:
                del d[name]
        return d


_OMITTED_AT_DEFAULT = {"norm_lr_mult": 1.0}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(device) -> None:
    """The form of a device name: auto | cpu | cuda | cuda:N | mps (whether it exists: resolve_device)."""
    allowed = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device: got {device!r}; allowed values are {allowed}")
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device: got {device!r}; allowed values are {allowed}")


def resolve_device(device: str = "auto") -> torch.device:
    """``device`` as a torch.device; "auto": CUDA, else MPS, else CPU. A device this machine lacks
    is a ValueError here, before any work."""
    check_device_name(device)
    if device != "auto":
        device = torch.device(device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (device.index or 0) >= count:
                raise ValueError(f"device: got {str(device)!r}, but this machine has {count} CUDA device(s); "
                                 "allowed: 'auto' or 'cpu'" + (f" or cuda:0..cuda:{count - 1}" if count else ""))
        elif device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                           and torch.backends.mps.is_available()):
            raise ValueError("device: got 'mps', but MPS is not available on this machine; allowed: 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _train_loader(images, labels, dataset, config: "TrainConfig", seed: int, device, shard=(0, 1)):
    from .data import BatchLoader

    # always shuffled; `augment` only switches the random crop + flip
    return BatchLoader(images, labels, batch_size=config.batch_size, train=True, augment=config.augment,
                       mean=dataset.mean, std=dataset.std, seed=seed, device=device,
                       channels_last=config.channels_last, drop_last=True, shard=shard)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL with one GPU per process where CUDA is available, gloo on
    the CPU. Without torchrun's variables: nothing, (0, 1). Returns (rank, world size)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return distributed_context()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is then this rank's GPU
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return distributed_context()


# CPU inference at this scale is bound by memory traffic: past a few hundred 32x32 images a batch spills
# the caches and runs slower (width-0.5 MobileNetV2, one thread: ~1,800 images/s in batches of 250, ~1,100
# in batches of 500), so on a CPU a larger evaluation batch is taken in chunks of this size (same result).
CPU_EVAL_CHUNK = 256


def folded_for_inference(model):
    """``model`` for evaluation with every BatchNorm2d that directly follows a plain Conv2d in an
    ``nn.Sequential`` folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the
    same function in eval mode, one memory pass fewer per layer. A folded copy (its hooks are the
    model's hook objects); ``model`` itself when it has no such pair, is no ``nn.Module``, has a module
    recording what it sees (``record``), or has a hook on a module that folding replaces. A module whose
    class sets ``fold_batchnorm = False`` (its code reads its BatchNorms) is left whole."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def pairs(root):
        stack = [root]
        while stack:
            module = stack.pop()
            if not getattr(module, "fold_batchnorm", True):
                continue
            # a subclass with its own forward may read a pair, unless it says it runs as nn.Sequential in eval mode
            if type(module).forward is nn.Sequential.forward or getattr(module, "sequential_in_eval", False):
                names = list(module._modules)
                for conv, norm in zip(names, names[1:]):
                    c, n = module._modules[conv], module._modules[norm]
                    if type(c) is nn.Conv2d and type(n) is nn.BatchNorm2d and n.running_mean is not None:
                        yield module, conv, norm
            stack.extend(module.children())

    if not isinstance(model, nn.Module) or any(getattr(m, "record", False) for m in model.modules()):
        return model  # a recording module keeps what it saw: on the model, not on a copy
    found = list(pairs(model))
    replaced = [s._modules[name] for s, conv, norm in found for name in (conv, norm)]
    if not found or any(m._forward_hooks or m._forward_pre_hooks for m in replaced):
        return model
    import copy

    hooks = [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]
    folded = copy.deepcopy(model, memo={id(h): h for h in hooks}).eval()  # the copy calls the model's own hooks
    for sequential, conv, norm in list(pairs(folded)):
        sequential._modules[conv] = fuse_conv_bn_eval(sequential._modules[conv], sequential._modules[norm])
        sequential._modules[norm] = nn.Identity()
    return folded


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, batch_size: int = 500,
             device: str | torch.device = "auto", channels_last: bool = False, flip: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on uint8 ``images`` (eval mode, no augmentation).
    ``flip``: test-time augmentation, the mean of the logits of each image and its left-right mirror
    (twice the evaluation cost; report it apart from the plain accuracy)."""
    check_bool("flip", flip)
    from .data import BatchLoader

    if isinstance(images, torch.Tensor) and images.ndim == 4 and len(images) == 0:  # it used to read accuracy 0.0
        raise ValueError(f"images: got no images to evaluate (shape {tuple(images.shape)}); allowed: at least one "
                         "image")
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    inference = folded_for_inference(model)
    # sums stay on the device: one host sync per evaluation, not two per batch
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    chunk = min(batch_size, CPU_EVAL_CHUNK) if device.type == "cpu" else batch_size
    loader = BatchLoader(images, labels, batch_size=chunk, train=False, mean=mean, std=std, seed=0,
                         device=device, channels_last=channels_last, drop_last=False)
    with torch.autocast(device.type, dtype=_amp_dtype("bfloat16", device), enabled=device.type == "cuda"):
        for x, y in loader:
            logits = inference(x).float()
            if flip:
                logits = (logits + inference(x.flip(3)).float()) / 2
            if count == 0:  # once: labels beyond the model's outputs fail deep inside cross-entropy
                check_labels(labels, logits.shape[1])
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
    model.train(was_training)
    return {"accuracy": correct.item() / max(count, 1), "loss": loss_sum.item() / max(count, 1), "count": count}


def _amp_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return getattr(torch, name)


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
         "lr_mult": (config.new_module_lr_mult if new else 1.0) * (1.0 if decay else config.norm_lr_mult)}
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
    curve: list[dict] = dataclasses.field(default_factory=list)  # validation points (TrainConfig.curve_points)


DIVERGENCE_FACTOR = 10.0  # a mean loss this many times ln(num_classes) (chance) is a diverged run


def warmup_epochs(config: TrainConfig) -> int:
    """Epochs the one-cycle warm-up reaches into (the loss may spike while the lr climbs)."""
    return math.ceil(config.warmup_fraction * config.epochs) if config.schedule == "onecycle" else 0


def check_divergence(history: list[dict], num_classes: int, warmup: int = 0, final: bool = False) -> str | None:
    """Why the run whose per-epoch records are ``history`` (the last one just finished) has
    diverged, or None. Diverged: a non-finite loss; after the warm-up epochs (or at the last
    epoch) a mean training loss above DIVERGENCE_FACTOR x ln(num_classes), or training accuracy
    at chance with a rising loss above twice chance's. Runs at lr 50..1e6 ended "finished" with
    losses of 1e4..5e12 before this check; a healthy run starts at ln(num_classes) and goes down."""
    record = history[-1]
    epoch, loss = record["epoch"], record["train_loss"]
    for name in ("train_loss", "test_loss"):
        if not math.isfinite(record[name]):
            return (f"{name.replace('_', ' ')} became {record[name]} at epoch {epoch}; "
                    "the run is stopped (try a lower lr)")
    if epoch <= warmup and not final:
        return None
    chance_loss = math.log(max(num_classes, 2))
    if loss > DIVERGENCE_FACTOR * chance_loss:
        return (f"train loss {loss:.4g} at epoch {epoch} is above {DIVERGENCE_FACTOR:g} x ln({num_classes}) = "
                f"{DIVERGENCE_FACTOR * chance_loss:.3g}: the run diverged and is stopped (try a lower lr)")
    if len(history) >= 2 and record["train_accuracy"] <= 1.2 / num_classes and loss > 2 * chance_loss \
            and loss > history[-2]["train_loss"]:
        return (f"train accuracy {record['train_accuracy']:.3f} at epoch {epoch} is at chance (1/{num_classes}) and "
                f"the train loss rose to {loss:.4g}: the run diverged and is stopped (try a lower lr)")
    return None


def model_signature(model: nn.Module) -> str:
    """What a checkpoint must match besides its tensor shapes: the model's ModelConfig when it has
    one (a Mish checkpoint has a ReLU6 model's shapes), else its module types by name."""
    config = getattr(model, "config", None)
    described = (config.to_dict() if hasattr(config, "to_dict")
                 else [(name, type(m).__name__) for name, m in model.named_modules()])
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_checkpoint(model, optimizer, scheduler, scaler, config: TrainConfig, path: Path, device) -> dict:
    """Restore every state from ``path``; a CheckpointError naming the file when it cannot be resumed."""
    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint_path: {path} {problem}; allowed: a checkpoint of this model and "
                               "TrainConfig (delete or move the file to train from the start)", path)

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated, not a torch file, unpickling refused: all unusable
        raise refuse(f"is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    needed = ("model", "optimizer", "scheduler", "scaler", "rng", "history", "epoch", "seconds")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise refuse("is not a training checkpoint (missing " + (", ".join(
            k for k in needed if k not in state) if isinstance(state, dict) else "everything") + ")")
    if state.get("config") not in (None, config.to_dict()):
        raise ValueError(f"checkpoint_path: {path} belongs to a run with another TrainConfig "
                         f"({state['config']}); allowed: a checkpoint of this config, or a new path")
    if state.get("model_signature") not in (None, model_signature(model)):
        raise refuse("belongs to another model (its model config differs from this model's)")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(model, state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise refuse(f"does not fit this model ({str(error).splitlines()[0][:200]} ...)") from None
    return state


def check_labels(labels: torch.Tensor, num_outputs: int, field: str = "labels") -> None:
    """Class indices must lie in 0..num_outputs-1 (cross-entropy otherwise fails deep in torch)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_outputs):
        raise ValueError(f"{field}: got class indices {int(labels.min())}..{int(labels.max())} for a model with "
                         f"{num_outputs} outputs; allowed: 0..{num_outputs - 1} (build the model with num_classes >= "
                         f"{int(labels.max()) + 1})")


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


def zero_init_residual_(model: nn.Module) -> int:
    """Zero the scale of the last BatchNorm of every residual branch (blocks with ``use_res_connect``
    whose ``conv`` ends in a BatchNorm), so that each such block starts as the identity (Goyal et al.,
    2017). Returns how many were zeroed."""
    count = 0
    for module in model.modules():
        conv = getattr(module, "conv", None)
        if getattr(module, "use_res_connect", False) and isinstance(conv, nn.Sequential) \
                and isinstance(conv[-1], nn.modules.batchnorm._BatchNorm):
            nn.init.zeros_(conv[-1].weight)
            count += 1
    return count


class _WeightAverage:
    """An exponential moving average of the weights and BN buffers (torch.optim.swa_utils), with the
    decay warmed up as min(decay, (1 + t) / (10 + t)) so that a short run's average is not dominated
    by its first, random weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.decay, self.steps = decay, 0
        self.model = AveragedModel(model, use_buffers=True)

    def update(self, model: nn.Module) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.model.multi_avg_fn = get_ema_multi_avg_fn(min(self.decay, (1 + self.steps) / (10 + self.steps)))
        self.model.update_parameters(model)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]


@dataclass
class _Training:
    """Everything one call of :func:`train_model` trains with (built by :func:`_set_up`)."""

    model: nn.Module            # the model the caller passed (its weights are the result)
    step_model: nn.Module       # what the steps call: the model, wrapped by DDP and/or torch.compile
    eval_model: nn.Module       # what is evaluated: the model, or its weight average
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    average: "_WeightAverage | None"
    loss_fn: nn.Module
    device: torch.device
    amp_dtype: torch.dtype
    use_amp: bool
    rank: int
    world: int
    steps_per_epoch: int


def _check_model_fits(model: nn.Module, dataset) -> None:
    """A dataset that cannot train a classifier (fewer than two classes, no training or test images), a
    model with fewer outputs than its classes, or labels beyond them: a clear error now, not after training."""
    if dataset.num_classes < 2:  # one class trains to loss 0 and accuracy 1 and means nothing
        raise ValueError(f"dataset: {dataset.name!r} has {dataset.num_classes} class(es) {tuple(dataset.classes)}; "
                         "allowed: at least 2 classes")
    for split in ("train", "test"):
        if len(getattr(dataset, f"{split}_labels")) == 0:
            raise ValueError(f"dataset.{split}_images: dataset {dataset.name!r} has no {split} images; allowed: "
                             "at least one")
    num_outputs = getattr(getattr(model, "config", None), "num_classes", None)
    if num_outputs is None:
        return
    if num_outputs < dataset.num_classes:
        raise ValueError(f"num_classes: the model has {num_outputs} outputs but dataset {dataset.name!r} has "
                         f"{dataset.num_classes} classes; allowed: num_classes >= {dataset.num_classes}")
    check_labels(dataset.train_labels, num_outputs, "dataset.train_labels")
    check_labels(dataset.test_labels, num_outputs, "dataset.test_labels")


def _set_up(model: nn.Module, dataset, config: TrainConfig, seed: int) -> _Training:
    """Seed, initialise and place the model; build the optimizer, schedule, scaler, weight average and
    the distributed wrapper. The order of the random draws is the run's: keep it."""
    device = resolve_device(config.device)
    _check_model_fits(model, dataset)
    torch.manual_seed(seed)
    schedule = getattr(model, "crossnorm_schedule", None)
    if schedule is not None:
        schedule.seed(seed)
    if config.zero_init_residual:
        zero_init_residual_(model)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    rank, world = distributed_context()
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch_size: got {config.batch_size} for {world} ranks; allowed: a multiple of the "
                         "world size (each rank trains on an equal share of every global batch)")
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place for a model's BatchNorm children
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: got {config.batch_size}, larger than the {len(dataset.train_labels)} "
                         "training images; allowed: at most the training-set size")
    optimizer, scheduler = _make_optimizer(model, config, steps_per_epoch)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = _amp_dtype(config.amp_dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    average = _WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    step_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index or torch.cuda.current_device()]
                                             if device.type == "cuda" else None)
    step_model = torch.compile(step_model) if config.compile else step_model
    return _Training(model, step_model, average.model.module if average is not None else model, optimizer,
                     scheduler, scaler, average, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device,
                     amp_dtype, use_amp, rank, world, steps_per_epoch)


def _train_epoch(t: _Training, loader, description: str, show_progress: bool,
                 after_step: Callable[[int], None] | None = None) -> tuple[float, float]:
    """One pass over ``loader``: (mean training loss, training accuracy), over every rank's share. The
    sums stay on the device: the epoch's one host sync is at its end. ``after_step(i)``: called after the
    epoch's i-th step (the learning curve's evaluations)."""
    t.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)
    correct = torch.zeros((), dtype=torch.int64, device=t.device)
    seen = 0
    for step, (x, y) in enumerate(progress(loader, enabled=show_progress, desc=description, leave=False,
                                           unit="batch"), start=1):
        with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.use_amp):
            logits = t.step_model(x)
            loss = t.loss_fn(logits.float(), y)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        if t.average is not None:
            t.average.update(t.model)
        loss_sum += loss.detach() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if after_step is not None:
            after_step(step)
    if t.world > 1:  # the epoch's numbers over the global batches; BN running statistics: rank 0's
        import torch.distributed as dist

        totals = torch.stack([loss_sum, correct.to(torch.float64),
                              torch.tensor(float(seen), dtype=torch.float64, device=t.device)])
        dist.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        for buffer in t.model.buffers():
            dist.broadcast(buffer, 0)
    return loss_sum.item() / seen, float(correct.item()) / seen


def _save_checkpoint(t: _Training, config: TrainConfig, path: Path, history: list[dict], seconds: float,
                     curve: list[dict]) -> None:
    state = {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
             "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(),
             "rng": _rng_state(t.model), "config": config.to_dict(), "history": history,
             "model_signature": model_signature(t.model), "epoch": len(history), "seconds": seconds,
             "curve": curve}
    if t.average is not None:
        state["average"] = t.average.state_dict()
    save_atomic(state, path)


def _curve_steps(config: TrainConfig, steps_per_epoch: int) -> set[int]:
    """The global steps (1-based) after which the learning curve evaluates: evenly spread over the run."""
    total, points = steps_per_epoch * config.epochs, min(config.curve_points, steps_per_epoch * config.epochs)
    return {round(total * (i + 1) / points) for i in range(points)} if points else set()


def train_model(model: nn.Module, dataset, config: TrainConfig = TrainConfig(), seed: int = 0,
                checkpoint_path: str | Path | None = None, show_progress: bool = True,
                on_epoch: Callable[[dict], None] | None = None, stop_after_epoch: int | None = None) -> TrainResult:
    """Train ``model`` on ``dataset`` (a :class:`mnv2lib.engine.data.Dataset`); returns per-epoch metrics.

    With ``checkpoint_path`` a checkpoint is written after every epoch and an existing one
    is resumed. ``stop_after_epoch`` ends the call early (to test resume), as a kill would.
    With ``config.ema_decay`` the model ends holding the averaged weights. With ``config.curve_points``
    and a dataset with validation images (``data.split_validation``), the result's ``curve`` holds the
    validation accuracy and loss at that many evenly spaced steps (the training is the same without it).

    On a GPU the uint8 images are copied to it once and augmented there in batches, and the loop
    makes no host sync per step (losses and accuracies are summed on the device and read once per
    epoch), so the GPU is never left waiting for Python.

    Inside a torch.distributed process group (``torchrun``, see :func:`init_distributed`) the model
    is wrapped in DistributedDataParallel and each rank trains on its share of every global batch
    of ``config.batch_size`` (which must divide by the world size); the gradients are averaged, so
    the step is the single-process step except for BatchNorm: on CUDA the BatchNorms become
    SyncBatchNorm (statistics over the global batch, as in one process); on the CPU (gloo, where
    torch has no SyncBatchNorm) each rank normalizes with its own share's statistics. Running BN
    statistics are taken from rank 0 after every epoch, so every rank evaluates the same model;
    only rank 0 writes the checkpoint.
    """
    # (some 55 lines under the docstring: the epoch loop reads best in one place; its parts are helpers)
    t = _set_up(model, dataset, config, seed)
    history: list[dict] = []
    curve: list[dict] = []
    start_epoch, elapsed_before = 0, 0.0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.exists():
        state = _load_checkpoint(t.model, t.optimizer, t.scheduler, t.scaler, config, checkpoint_path, t.device)
        if t.average is not None:
            t.average.load_state_dict(state["average"])
        history, start_epoch, elapsed_before = state["history"], state["epoch"], state["seconds"]
        curve = list(state.get("curve") or [])
    # the uint8 training images live on the training device (once per call, not per batch)
    train_images, train_labels = dataset.train_images.to(t.device), dataset.train_labels.to(t.device)
    t_start = time.perf_counter()
    epochs = progress(range(start_epoch, config.epochs), enabled=show_progress, desc="epochs", unit="epoch",
                      initial=start_epoch, total=config.epochs)
    validation = getattr(dataset, "validation_images", None)
    curve_steps = _curve_steps(config, t.steps_per_epoch) if validation is not None and len(validation) else set()

    def evaluate_curve(epoch: int, step: int) -> None:
        done = epoch * t.steps_per_epoch + step
        if done in curve_steps:
            v = evaluate(t.eval_model, validation, dataset.validation_labels, dataset.mean, dataset.std,
                         config.eval_batch_size, t.device, config.channels_last)
            curve.append({"step": done, "epoch": done / t.steps_per_epoch, "images_seen": done * config.batch_size,
                          "validation_accuracy": v["accuracy"], "validation_loss": v["loss"]})

    for epoch in epochs:
        t0 = time.perf_counter()
        loader = _train_loader(train_images, train_labels, dataset, config, seed * 100_003 + epoch, t.device,
                               shard=(t.rank, t.world))
        train_loss, train_accuracy = _train_epoch(t, loader, f"epoch {epoch + 1}", show_progress,
                                                  (lambda step, e=epoch: evaluate_curve(e, step)) if curve_steps
                                                  else None)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"loss became {train_loss} in epoch {epoch + 1}; "
                                     "the run is stopped (try a lower lr)")
        train_seconds = time.perf_counter() - t0
        test = evaluate(t.eval_model, dataset.test_images, dataset.test_labels, dataset.mean, dataset.std,
                        config.eval_batch_size, t.device, config.channels_last)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
                  "test_accuracy": test["accuracy"], "test_loss": test["loss"], "epoch_seconds": train_seconds,
                  "lr": t.scheduler.get_last_lr()[0]}
        history.append(record)
        diverged = check_divergence(history, dataset.num_classes, warmup_epochs(config),
                                    final=epoch + 1 == config.epochs)
        if diverged:
            raise TrainingDivergedError(diverged)
        if on_epoch:
            on_epoch(record)
        if checkpoint_path and t.rank == 0:
            _save_checkpoint(t, config, checkpoint_path, history, elapsed_before + time.perf_counter() - t_start, curve)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            break
    if t.average is not None and len(history) == config.epochs:
        t.model.load_state_dict(t.average.model.module.state_dict())
    return TrainResult(history=history, seconds=elapsed_before + time.perf_counter() - t_start,
                       device=str(t.device), resumed_from_epoch=start_epoch, curve=curve)

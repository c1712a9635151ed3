"""torchvision's ImageNet weights for MobileNetV2 and its variants, for fine-tuning.

``build_model(pretrained="imagenet", ...)`` loads them into any variant whose base
tensors have torchvision's shapes (width 1.0, the table's expansion ratios, 3 input
channels; any stem, activation, bottleneck activation, shortcut, attention or CNSN).
Tensors the variant adds (attention, CNSN) keep their initialization, and so does the
classifier when ``num_classes`` is not 1000. The model then carries
``base_parameter_names`` (the parameters that came from the file), which the training
engine reads to give the new modules their own learning rate
(``TrainConfig.new_module_lr_mult``), and ``pretrained_report``.

The file is looked for under ``pretrained/`` in ``$MNV2_DATA_DIR`` and ``data/``, then in
torch's hub cache; when it is nowhere it is downloaded into ``data/pretrained/`` (set
``MNV2_OFFLINE=1`` to forbid downloads). Offline without the file, the error says where to
put it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..utils import paths

# name -> torchvision weights enum member ("imagenet" is torchvision's DEFAULT)
WEIGHTS = {"imagenet": "IMAGENET1K_V2", "imagenet1k_v1": "IMAGENET1K_V1", "imagenet1k_v2": "IMAGENET1K_V2"}
OFFLINE_ENV_VAR = "MNV2_OFFLINE"
SUBDIR = "pretrained"


class PretrainedWeightsNotFound(FileNotFoundError):
    """The weights file is not cached and could not be downloaded."""


def _check_name(weights: str) -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"pretrained: got {weights!r}; allowed values are {(None,) + tuple(WEIGHTS)}")
    return WEIGHTS[weights]


def weights_url(weights: str = "imagenet") -> str:
    from torchvision.models import MobileNet_V2_Weights

    return MobileNet_V2_Weights[_check_name(weights)].url


def weights_file_name(weights: str = "imagenet") -> str:
    """torchvision's file name, e.g. ``mobilenet_v2-7ebf99e0.pth`` (the part after '-' is a hash prefix)."""
    return weights_url(weights).rsplit("/", 1)[-1]


def search_dirs() -> list[Path]:
    """Where a weights file is looked for, in order."""
    dirs = [d / SUBDIR for d in paths.data_search_dirs()]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return list(dict.fromkeys(dirs))


def download_dir() -> Path:
    return paths.DATA_DIR / SUBDIR


def downloads_allowed() -> bool:
    return os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() not in ("1", "true", "yes")


def find_weights_file(weights: str = "imagenet") -> Path | None:
    name = weights_file_name(weights)
    for folder in search_dirs():
        if (folder / name).is_file():
            return folder / name
    return None


def weights_path(weights: str = "imagenet", download: bool | None = None) -> Path:
    """The cached file, downloaded first when missing (unless offline); a clear error otherwise."""
    found = find_weights_file(weights)
    if found is not None:
        return found
    name, url, target = weights_file_name(weights), weights_url(weights), download_dir() / weights_file_name(weights)
    download = downloads_allowed() if download is None else download
    reason = f"downloads are switched off ({OFFLINE_ENV_VAR}=1)"
    if download:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), hash_prefix=name.split("-")[-1].split(".")[0],
                                           progress=True)
            return target
        except Exception as error:  # no network, proxy, hash mismatch: all end the same way for the user
            target.unlink(missing_ok=True)
            reason = f"the download failed ({type(error).__name__}: {error})"
    looked = ", ".join(str(d) for d in search_dirs())
    raise PretrainedWeightsNotFound(
        f"pretrained={weights!r}: torchvision's MobileNetV2 ImageNet weights ({name}) are not cached and "
        f"{reason}. Looked in: {looked}. To work offline, download {url} on a machine with internet access "
        f"and place the file at {target} (or in $MNV2_DATA_DIR/{SUBDIR}/).")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's message suggests weights_only=False, which would run the file's code
        raise ValueError(f"pretrained file {path}: not a PyTorch state_dict file ({type(error).__name__}); "
                         "allowed: a state_dict saved with torch.save, as torchvision's mobilenet_v2 weights "
                         "(delete the file to download it again)") from None
    for key in ("state_dict", "model"):  # a checkpoint wrapping the state_dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained file {path}: got {type(state).__name__}; allowed: a state_dict "
                         "(parameter name -> tensor), as torchvision's mobilenet_v2().state_dict()")
    return state


def reference_shapes() -> dict[str, torch.Size]:
    """Shapes of torchvision's MobileNetV2 tensors (ImageNet head), without loading any weights."""
    import torchvision

    return {k: v.shape for k, v in torchvision.models.mobilenet_v2().state_dict().items()}


def _is_head(key: str) -> bool:
    return key.startswith("classifier.")


def check_compatible(model: nn.Module, shapes: dict[str, torch.Size], weights: str = "imagenet") -> None:
    """A ValueError naming the tensors that do not fit, unless every base tensor (all but the
    classifier) exists in ``model`` with the same shape."""
    own = model.state_dict()
    problems = []
    for key, shape in shapes.items():
        if _is_head(key):
            continue
        if key not in own:
            problems.append(f"{key} (absent from the model)")
        elif own[key].shape != shape:
            problems.append(f"{key} (model {tuple(own[key].shape)}, weights {tuple(shape)})")
    if problems:
        config = getattr(model, "config", None)
        described = (f" for width_mult={config.width_mult}, expand_ratio={config.expand_ratio}, "
                     f"in_channels={config.in_channels}") if config is not None else ""
        raise ValueError(
            f"pretrained: got {weights!r}{described}, but {len(problems)} base tensors do not match "
            f"torchvision's MobileNetV2, e.g. {'; '.join(problems[:3])}. Allowed: variants with torchvision's base "
            "shapes (width_mult=1.0, expand_ratio=None, in_channels=3); stem, activations, shortcut, attention "
            "and CNSN may differ.")


def load_pretrained(model: nn.Module, weights: str = "imagenet",
                    state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """Load torchvision's ImageNet weights (or ``state_dict``) into ``model``; returns the report.

    Every base tensor must fit (see :func:`check_compatible`); the classifier is loaded when
    its shape fits (1000 classes) and kept freshly initialized otherwise.
    """
    _check_name(weights)
    check_compatible(model, reference_shapes(), weights)  # before any download
    path = None
    if state_dict is None:
        path = weights_path(weights)
        state_dict = read_state_dict(path)
    check_compatible(model, {k: v.shape for k, v in state_dict.items()}, weights)
    own = model.state_dict()
    loadable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    parameter_names = [name for name, _ in model.named_parameters()]
    model.base_parameter_names = frozenset(n for n in parameter_names if n in loadable)
    report = {
        "weights": weights, "file": str(path) if path else None, "loaded_tensors": len(loadable),
        "new_parameters": [n for n in parameter_names if n not in loadable],
        "classifier_reinitialized": any(_is_head(k) and k not in loadable for k in state_dict),
    }
    model.pretrained_report = report
    return report

"""What Triplet Attention attends to, and Grad-CAM for any model (notebook 02)."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import BRANCHES, record_attention

# The trained models notebook 02 compares (build_model overrides); the run plan
# (mnv2lib.workbook.plan) trains the same ones before the notebook runs.
TRAINED_MODELS = {"baseline": {}, "triplet": {"attention": "triplet"}}


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per Triplet Attention module (by block name), the sigmoid gate of each branch for ``images``
    (normalized float batch): channel_width (B, C, 1, W), height_channel (B, C, H, 1), spatial (B, 1, H, W)."""
    model.eval()
    with record_attention(model) as maps:
        model(images)
    if not maps:
        raise ValueError("model: has no Triplet Attention module; allowed: a model built with attention='triplet'")
    return {name.removesuffix(".attention"): gates for name, gates in maps.items()}


def branch_heatmap(gates: dict[str, torch.Tensor], branch: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A (B, H, W) map of how strongly a branch scales each pixel, averaged over channels.

    The channel-width gate varies along W only and the height-channel gate along H only, so their
    maps are stripes; "spatial" is a full map; "combined" is the mean of the three, i.e. the factor
    by which the module scales each pixel on average over channels.
    """
    allowed = BRANCHES + ("combined",)
    if branch not in allowed:
        raise ValueError(f"branch: got {branch!r}; allowed values are {allowed}")
    h = gates["height_channel"].shape[2]
    w = gates["channel_width"].shape[3]
    names = [b for b in BRANCHES if b in gates] if branch == "combined" else [branch]
    total = 0
    for name in names:
        total = total + gates[name].mean(1).expand(-1, h, w)  # channel average, broadcast to H x W
    heat = total / len(names)
    if size is not None:
        heat = nn.functional.interpolate(heat[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return heat


def attention_summary(maps: dict[str, dict[str, torch.Tensor]]):
    """Per block and branch: mean gate, spread over positions/channels, and map size (a DataFrame)."""
    import pandas as pd

    rows = []
    for block, gates in maps.items():
        for branch, g in gates.items():
            rows.append({"block": block, "branch": branch, "mean_gate": g.mean().item(), "std_gate": g.std().item(),
                         "min_gate": g.min().item(), "max_gate": g.max().item(), "shape": tuple(g.shape[1:])})
    return pd.DataFrame(rows)


def default_cam_layer(model: nn.Module) -> nn.Module:
    """The last feature layer (MobileNet's 1x1 head conv block), the usual Grad-CAM target."""
    return model.features[-1]


def grad_cam(model: nn.Module, images: torch.Tensor, target_layer: nn.Module | None = None,
             classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al., ICCV 2017): ReLU of the gradient-weighted sum of a layer's
    activation maps for the target class (default: the predicted one), upsampled to the input
    and scaled to [0, 1] per image. Returns (cams (B, H, W), target classes).

    Written here rather than taken from the ``grad-cam`` package: the method is a dozen lines,
    and that package pulls in OpenCV and scikit-learn.
    """
    model.eval()
    layer = target_layer or default_cam_layer(model)
    stored: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        output.retain_grad()
        stored["activation"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(images.detach().requires_grad_(False))
            targets = logits.argmax(1) if classes is None else classes
            logits.gather(1, targets[:, None]).sum().backward()
    finally:
        handle.remove()
    activation = stored["activation"]
    weights = activation.grad.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    model.zero_grad(set_to_none=True)
    return (cam - low) / (high - low).clamp_min(1e-12), targets


def pick_test_images(dataset, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` test images of distinct classes (as far as the classes go), chosen reproducibly."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset.test_labels), generator=g)
    chosen, seen = [], set()
    for i in order.tolist():
        label = int(dataset.test_labels[i])
        if label not in seen or len(seen) >= len(dataset.classes):
            chosen.append(i)
            seen.add(label)
        if len(chosen) == n:
            break
    index = torch.tensor(chosen)
    return dataset.test_images[index], dataset.test_labels[index]


def prepare(images_uint8: torch.Tensor, dataset) -> torch.Tensor:
    """uint8 images -> the normalized float batch the models were trained on."""
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).argmax(1)


def top_region_overlap(cam_a: torch.Tensor, cam_b: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Per image, intersection-over-union of the top ``fraction`` pixels of two heatmaps (B, H, W)."""
    k = max(1, int(fraction * cam_a[0].numel()))

    def top(cam):
        flat = cam.flatten(1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
        return mask

    a, b = top(cam_a), top(cam_b)
    return (a & b).sum(1).float() / (a | b).sum(1).float()



"""Figures of notebook 02: Triplet Attention maps and Grad-CAM."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.attention import branch_heatmap
from .common import FigureContext, new_figure, source_note

BRANCH_TITLES = {"channel_width": "channel-width (C x W)", "height_channel": "height-channel (H x C)",
                 "spatial": "spatial (H x W)", "combined": "mean of the three gates"}


def to_rgb(image_uint8: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) uint8 tensor -> (H, W, 3) array for imshow."""
    img = image_uint8.detach().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def make_attention_overlay_figure(image: torch.Tensor, gates: dict[str, torch.Tensor], block: str,
                                  index: int = 0, context: FigureContext | None = None,
                                  class_name: str | None = None) -> Figure:
    """One image and one block: each branch's channel-averaged gate over the image, and the raw
    2-D gate maps of the two rotated branches (channels x width, height x channels)."""
    size = tuple(image.shape[-2:])
    branches = [b for b in ("channel_width", "height_channel", "spatial") if b in gates] + ["combined"]
    fig = new_figure(2.3 * (len(branches) + 1), 5.0)
    axes = fig.subplots(2, len(branches) + 1)
    rgb = to_rgb(image)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title(class_name or "input")
    heats = {b: branch_heatmap({k: v[index:index + 1] for k, v in gates.items()}, b, size)[0] for b in branches}
    vmin = min(float(h.min()) for h in heats.values())
    vmax = max(float(h.max()) for h in heats.values())
    for ax, branch in zip(axes[0, 1:], branches):
        ax.imshow(rgb)
        im = ax.imshow(heats[branch].numpy(), cmap="magma", alpha=0.6, vmin=vmin, vmax=vmax)
        ax.set_title(BRANCH_TITLES[branch], fontsize=9)
    fig.colorbar(im, ax=axes[0, -1], label="gate (channel mean)", shrink=0.8)
    raw = {"channel_width": gates["channel_width"][index, :, 0, :], "height_channel": gates["height_channel"][index, :, :, 0].T}
    axes[1, 0].axis("off")
    axes[1, 0].text(0, 0.5, f"block {block}\nraw gate maps", va="center", fontsize=9)
    for ax, (branch, m) in zip(axes[1, 1:3], raw.items()):
        im2 = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set_title(BRANCH_TITLES[branch], fontsize=9)
        ax.set_xlabel("width" if branch == "channel_width" else "channel")
        ax.set_ylabel("channel" if branch == "channel_width" else "height")
    fig.colorbar(im2, ax=axes[1, 2], label="gate", shrink=0.8)
    for ax in axes[1, 3:]:
        ax.axis("off")
    for ax in axes[0]:
        ax.set_xticks([]), ax.set_yticks([])
    return source_note(fig, context)


def make_attention_blocks_figure(images: torch.Tensor, maps: dict[str, dict[str, torch.Tensor]], branch: str,
                                 context: FigureContext | None = None, class_names: list[str] | None = None,
                                 max_blocks: int = 9) -> Figure:
    """Images (rows) x blocks (columns): one branch's gate over the image, from early to late blocks."""
    blocks = list(maps)
    if len(blocks) > max_blocks:  # evenly spaced blocks, first and last included
        picks = np.linspace(0, len(blocks) - 1, max_blocks).round().astype(int)
        blocks = [blocks[i] for i in picks]
    n = images.shape[0]
    fig = new_figure(1.45 * (len(blocks) + 1), 1.5 * n + 0.6)
    axes = fig.subplots(n, len(blocks) + 1, squeeze=False)
    size = tuple(images.shape[-2:])
    for r in range(n):
        rgb = to_rgb(images[r])
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_ylabel(class_names[r] if class_names else f"image {r}", fontsize=8)
        for c, block in enumerate(blocks, start=1):
            heat = branch_heatmap({k: v[r:r + 1] for k, v in maps[block].items()}, branch, size)[0]
            axes[r, c].imshow(rgb)
            axes[r, c].imshow(heat.numpy(), cmap="magma", alpha=0.6)
            if r == 0:
                axes[r, c].set_title(f"block {block.split('.')[-1]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Triplet Attention, {BRANCH_TITLES[branch]}: early to late blocks", fontsize=10)
    return source_note(fig, context)


def make_gradcam_figure(images: torch.Tensor, cams: dict[str, torch.Tensor], predictions: dict[str, list[str]],
                        truths: list[str], context: FigureContext | None = None) -> Figure:
    """Images (columns) x models (rows): Grad-CAM of each model on the same images, titled with its prediction."""
    models = list(cams)
    n = images.shape[0]
    fig = new_figure(1.6 * n + 0.8, 1.8 * (len(models) + 1))
    axes = fig.subplots(len(models) + 1, n, squeeze=False)
    for c in range(n):
        rgb = to_rgb(images[c])
        axes[0, c].imshow(rgb)
        axes[0, c].set_title(truths[c], fontsize=8)
        for r, name in enumerate(models, start=1):
            axes[r, c].imshow(rgb)
            im = axes[r, c].imshow(cams[name][c].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ok = predictions[name][c] == truths[c]
            axes[r, c].set_title(predictions[name][c], fontsize=8, color="green" if ok else "red")
    axes[0, 0].set_ylabel("image\n(true class)", fontsize=8)
    for r, name in enumerate(models, start=1):
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[1:, -1], label="Grad-CAM (per-image scaled)", shrink=0.7)
    return source_note(fig, context)


def make_attention_detail_figure(image: torch.Tensor, maps: dict[str, dict[str, torch.Tensor]], block: str,
                                 branch: str, index: int = 0, context: FigureContext | None = None,
                                 class_name: str | None = None) -> Figure:
    """One image, block and branch: the input, the branch's gate over it, and the gate at native resolution."""
    gates = {k: v[index:index + 1] for k, v in maps[block].items()}
    size = tuple(image.shape[-2:])
    fig = new_figure(8.4, 3.0)
    axes = fig.subplots(1, 3)
    rgb = to_rgb(image)
    axes[0].imshow(rgb)
    axes[0].set_title(class_name or "input", fontsize=9)
    axes[1].imshow(rgb)
    heat = branch_heatmap(gates, branch, size)[0]
    im = axes[1].imshow(heat.numpy(), cmap="magma", alpha=0.6)
    axes[1].set_title(f"block {block}: {BRANCH_TITLES[branch]}", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="gate (channel mean)")
    if branch == "channel_width":
        native, xlabel, ylabel = gates["channel_width"][0, :, 0, :], "width", "channel"
    elif branch == "height_channel":
        native, xlabel, ylabel = gates["height_channel"][0, :, :, 0].T, "channel", "height"
    else:
        native, xlabel, ylabel = branch_heatmap(gates, branch)[0], "width", "height"
    # the gate's own range (gates of a trained model often span only ~0.3-0.6 of [0, 1])
    im2 = axes[2].imshow(native.numpy(), cmap="magma", aspect="auto")
    axes[2].set_xlabel(xlabel), axes[2].set_ylabel(ylabel)
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_title("gate at native resolution", fontsize=9)
    fig.colorbar(im2, ax=axes[2], shrink=0.8, label="gate")
    for ax in axes[:2]:
        ax.set_xticks([]), ax.set_yticks([])
    return source_note(fig, context)

"""Triplet Attention operators over ``csrc/triplet_attention.c``.

- ``mnv2::triplet_attention``: the whole module in training (or with autograd): ZPool of the three
  branches in one pass over x, the three 2->1 k x k convolutions, BatchNorm (batch statistics, whose
  running averages it updates in place, or running statistics) and sigmoid of the small gate planes,
  and the gating ``x * (g_cw + g_hc + g_s) / 3``. It returns the output and what backward needs.
- ``mnv2::triplet_attention_backward``: gradients of x, conv weights and BN affine parameters, two
  passes over (x, grad).
- ``mnv2::triplet_attention_inference``: running statistics, no autograd; one fused pass per sample.
  ``mnv2::triplet_attention_inference_`` writes the result over x (for a network's own intermediates).

Arguments per branch (channel_width, height_channel, spatial): conv weight (1, 2, k, k), BN weight,
bias, running mean, running var, batches tracked (shape (1,) each). x: float32 CPU, (B, C, H, W),
contiguous or channels_last. Planes are stored with their longer side contiguous; a channels_last x
is read in place with the branches rotated ("lanes", see ``LANES``).
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kernels
from .checks import check_feature_map, check_float32_cpu, check_same_layout, is_channels_last, memory_format
from .library import define

SLACK = 32  # zero floats after each pooled map: the C vector tiles read past a row's end

# A channels_last x is a contiguous (B, H, W, C) tensor y; Triplet Attention of y is that of x with the
# branches rotated: y's channel-width plane is x's height-channel plane, y's height-channel plane x's
# spatial plane transposed, y's spatial plane x's channel-width plane transposed. A lane: (branch index
# of x: 0 cw, 1 hc, 2 s; that branch's weight is read transposed).
LANES = {False: ((0, False), (1, False), (2, False)), True: ((1, False), (2, True), (0, True))}


def _view(x: Tensor) -> tuple[Tensor, bool]:
    """x as the contiguous tensor the kernels read, and whether it is x's NHWC memory."""
    nhwc = is_channels_last(x)
    return (x.permute(0, 2, 3, 1) if nhwc else x), nhwc


def _flags(c: int, h: int, w: int) -> tuple[bool, bool, bool]:
    """Per lane plane (cw (C, W), hc (H, C), s (H, W)): stored transposed so its longer side is contiguous?"""
    return c > w, h > c, h > w


def _plane_shapes(c: int, h: int, w: int, flags) -> list[tuple[int, int]]:
    official = ((c, w), (h, c), (h, w))
    return [(q, r) if t else (r, q) for (r, q), t in zip(official, flags)]


def _geometry(x: Tensor, k: int):
    xv, nhwc = _view(x)
    batch, c, h, w = xv.shape
    flags = _flags(c, h, w)
    return xv, nhwc, (batch, c, h, w), flags, _plane_shapes(c, h, w, flags), k // 2


def _padded_maps(x: Tensor, batch: int, rows: int, cols: int) -> Tensor:
    n = batch * 2 * rows * cols
    return x.new_zeros(n + SLACK)[:n].view(batch, 2, rows, cols)


def _with_slack(maps: Tensor) -> Tensor:
    """``maps`` if zero slack follows it in its storage (as the forward made it), else a padded copy."""
    if maps.is_contiguous() and maps.storage_offset() == 0 and \
            maps.untyped_storage().nbytes() >= (maps.numel() + SLACK) * maps.element_size():
        return maps
    padded = _padded_maps(maps, *maps.shape[:1], *maps.shape[2:])
    padded.copy_(maps)
    return padded


def _check_params(op: str, x: Tensor, weights, vectors: dict[str, list[Tensor]]) -> int:
    check_feature_map(op, "x", x)
    k = weights[0].shape[-1] if weights[0].dim() == 4 else -1
    one = (1,)
    weight_shape = (1, 2, k, k)
    if k >= 1 and k % 2 == 1 and all(w.dtype == torch.float32 and w.is_cpu and w.shape == weight_shape
                                     for w in weights) \
            and all(t.dtype == torch.float32 and t.is_cpu and t.shape == one for ts in vectors.values() for t in ts):
        return k  # (one pass of cheap tests: this runs on every call)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"mnv2::{op}: conv weights must have shape (1, 2, k, k) with odd k; got "
                         f"{tuple(weights[0].shape)}")
    for name, w in zip(("w_cw", "w_hc", "w_s"), weights):
        check_float32_cpu(op, name, w, (1, 2, k, k))
    for name, tensors in vectors.items():
        for branch, t in zip(("cw", "hc", "s"), tensors):
            check_float32_cpu(op, f"{name}_{branch}", t, one)
    return k


def _forward(x, weights, gammas, betas, means, variances, training, eps):
    k = _check_params("triplet_attention", x, weights, {"gamma": gammas, "beta": betas, "mean": means,
                                                         "var": variances})
    lib, threads = kernels.require("triplet_attention"), kernels.threads()
    xv, nhwc, (batch, c, h, w), flags, shapes, pad = _geometry(x, k)
    lanes = LANES[nhwc]
    maps = [_padded_maps(x, batch, r + 2 * pad, q + 2 * pad) for r, q in shapes]
    lib.ta_pool(xv.data_ptr(), batch, c, h, w, pad, maps[0].data_ptr(), flags[0], maps[1].data_ptr(), flags[1],
                maps[2].data_ptr(), flags[2], threads)
    gates, xhats = [], []
    invstd = x.new_empty(3)
    batch_stats = x.new_zeros(2, 3)  # (left zero without batch statistics)
    for lane, ((branch, transposed), m, (r, q), t) in enumerate(zip(lanes, maps, shapes, flags)):
        weight = weights[branch].contiguous()
        z, g, xhat = x.new_empty(batch, r, q), x.new_empty(batch, r, q), x.new_empty(batch, r, q)
        lib.ta_conv(m.data_ptr(), batch, r, q, k, weight.data_ptr(), t ^ transposed, z.data_ptr(), threads)
        lib.bn_sigmoid_forward(z.data_ptr(), batch, 1, r * q, gammas[branch].data_ptr(), betas[branch].data_ptr(),
                               means[branch].data_ptr(), variances[branch].data_ptr(), int(training), eps,
                               g.data_ptr(), xhat.data_ptr(), invstd[lane:].data_ptr(),
                               batch_stats[0, branch:].data_ptr(), batch_stats[1, branch:].data_ptr())
        gates.append(g)
        xhats.append(xhat)
    out = torch.empty_like(x)
    lib.ta_combine(xv.data_ptr(), batch, c, h, w, gates[0].data_ptr(), flags[0], gates[1].data_ptr(), flags[1],
                   gates[2].data_ptr(), flags[2], _view(out)[0].data_ptr(), threads)
    return out, maps, gates, xhats, invstd, batch_stats


@define("mnv2::triplet_attention", mutates_args=(), device_types="cpu")
def triplet_attention(
        x: Tensor, w_cw: Tensor, w_hc: Tensor, w_s: Tensor,
        gamma_cw: Tensor, gamma_hc: Tensor, gamma_s: Tensor, beta_cw: Tensor, beta_hc: Tensor, beta_s: Tensor,
        mean_cw: Tensor, mean_hc: Tensor, mean_s: Tensor, var_cw: Tensor, var_hc: Tensor, var_s: Tensor,
        training: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, pooled maps x3, gates x3, normalized conv outputs x3, inverse stds (3,) per lane,
    batch statistics (2, 3): mean and unbiased variance per branch (training; for the running averages,
    which ``mnv2::batch_norm_update`` applies: an operator with autograd cannot mutate its inputs))."""
    out, maps, gates, xhats, invstd, batch_stats = _forward(
        x, (w_cw, w_hc, w_s), (gamma_cw, gamma_hc, gamma_s), (beta_cw, beta_hc, beta_s), (mean_cw, mean_hc, mean_s),
        (var_cw, var_hc, var_s), training, eps)
    return (out, *maps, *gates, *xhats, invstd, batch_stats)


@triplet_attention.register_fake
def _(x, w_cw, *args):
    k = w_cw.shape[-1]
    _, _, (batch, c, h, w), flags, shapes, pad = _geometry(x, k)
    maps = [x.new_empty(batch, 2, r + 2 * pad, q + 2 * pad) for r, q in shapes]
    planes = [x.new_empty(batch, r, q) for r, q in shapes]
    return (torch.empty_like(x), *maps, *planes, *[x.new_empty(batch, r, q) for r, q in shapes], x.new_empty(3),
            x.new_empty(2, 3))


@define("mnv2::triplet_attention_backward", mutates_args=(), device_types="cpu")
def triplet_attention_backward(
        grad: Tensor, x: Tensor, w_cw: Tensor, w_hc: Tensor, w_s: Tensor,
        gamma_cw: Tensor, gamma_hc: Tensor, gamma_s: Tensor,
        maps_0: Tensor, maps_1: Tensor, maps_2: Tensor, gates_0: Tensor, gates_1: Tensor, gates_2: Tensor,
        xhat_0: Tensor, xhat_1: Tensor, xhat_2: Tensor, invstd: Tensor, training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad conv weights (3, 1, 2, k, k)... as three, grad BN weights (3,), grad BN biases (3,))."""
    weights, gammas = (w_cw, w_hc, w_s), (gamma_cw, gamma_hc, gamma_s)
    k = _check_params("triplet_attention_backward", x, weights, {"gamma": gammas})
    check_same_layout("triplet_attention_backward", "grad", grad, x)
    lib, threads = kernels.require("triplet_attention"), kernels.threads()
    xv, nhwc, (batch, c, h, w), flags, shapes, pad = _geometry(x, k)
    gv = _view(grad)[0]
    lanes = LANES[nhwc]
    maps = [_with_slack(m) for m in (maps_0, maps_1, maps_2)]
    gates, xhats = (gates_0, gates_1, gates_2), (xhat_0, xhat_1, xhat_2)
    for name, tensors in (("maps", maps), ("gates", gates), ("xhat", xhats)):
        for lane, (t, (r, q)) in enumerate(zip(tensors, shapes)):
            expected = (batch, 2, r + 2 * pad, q + 2 * pad) if name == "maps" else (batch, r, q)
            check_float32_cpu("triplet_attention_backward", f"{name}_{lane}", t, expected)
    gates = [g.contiguous() for g in gates]
    xhats = [t.contiguous() for t in xhats]
    d_gates = [x.new_empty(batch, r, q) for r, q in shapes]
    ties = [x.new_empty(batch, c, w), x.new_empty(batch, c, h), x.new_empty(batch, h, w)]
    lib.ta_backward_reduce(xv.data_ptr(), gv.data_ptr(), batch, c, h, w, pad, maps[0].data_ptr(), flags[0],
                           maps[1].data_ptr(), flags[1], maps[2].data_ptr(), flags[2], d_gates[0].data_ptr(),
                           d_gates[1].data_ptr(), d_gates[2].data_ptr(), ties[0].data_ptr(), ties[1].data_ptr(),
                           ties[2].data_ptr(), threads)
    d_affine = x.new_empty(2, 3)  # rows: BN weight, BN bias; columns: branches
    d_weights: list[Tensor | None] = [None] * 3
    d_maps = []
    invstd = invstd.contiguous()
    for lane, ((branch, transposed), m, (r, q), t) in enumerate(zip(lanes, maps, shapes, flags)):
        dz = x.new_empty(batch, r, q)
        lib.bn_sigmoid_backward(d_gates[lane].data_ptr(), gates[lane].data_ptr(), xhats[lane].data_ptr(), batch, 1,
                                r * q, gammas[branch].data_ptr(), invstd[lane:].data_ptr(), int(training),
                                dz.data_ptr(), d_affine[0, branch:].data_ptr(), d_affine[1, branch:].data_ptr())
        weight = weights[branch].contiguous()
        d_map, d_weight = x.new_empty(batch, 2, r, q), x.new_empty(1, 2, k, k)
        lib.ta_conv_backward(m.data_ptr(), dz.data_ptr(), batch, r, q, k, weight.data_ptr(), t ^ transposed,
                             d_map.data_ptr(), d_weight.data_ptr(), threads)
        d_maps.append(d_map)
        d_weights[branch] = d_weight
    dx = torch.empty_like(x)
    lib.ta_backward_dx(xv.data_ptr(), gv.data_ptr(), batch, c, h, w, pad, gates[0].data_ptr(), gates[1].data_ptr(),
                       gates[2].data_ptr(), maps[0].data_ptr(), maps[1].data_ptr(), maps[2].data_ptr(), *flags,
                       d_maps[0].data_ptr(), d_maps[1].data_ptr(), d_maps[2].data_ptr(), ties[0].data_ptr(),
                       ties[1].data_ptr(), ties[2].data_ptr(), _view(dx)[0].data_ptr(), threads)
    return dx, d_weights[0], d_weights[1], d_weights[2], d_affine[0].clone(), d_affine[1].clone()


@triplet_attention_backward.register_fake
def _(grad, x, w_cw, w_hc, w_s, *args):
    return (torch.empty_like(x), torch.empty_like(w_cw, memory_format=torch.contiguous_format),
            torch.empty_like(w_hc, memory_format=torch.contiguous_format),
            torch.empty_like(w_s, memory_format=torch.contiguous_format), x.new_empty(3), x.new_empty(3))


def _setup_context(ctx, inputs, output):
    x, w_cw, w_hc, w_s, g_cw, g_hc, g_s = inputs[:7]
    ctx.training = inputs[16]
    ctx.save_for_backward(x, w_cw, w_hc, w_s, g_cw, g_hc, g_s, *output[1:11])
    # the outputs after `out` are saved state, not results: no gradient buffers for them (autograd
    # would otherwise fill zeros of their size in every backward)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):
    x, *rest = ctx.saved_tensors
    grad = grad.contiguous(memory_format=memory_format(x))
    dx, dw_cw, dw_hc, dw_s, d_gamma, d_beta = torch.ops.mnv2.triplet_attention_backward(grad, x, *rest, ctx.training)
    gammas, betas = d_gamma.split(1), d_beta.split(1)
    return (dx, dw_cw, dw_hc, dw_s, *gammas, *betas, *[None] * 6, None, None)


triplet_attention.register_autograd(_backward, setup_context=_setup_context)


def _inference(x, weights, bn, eps, out) -> None:
    """Triplet Attention of x with BatchNorm's running statistics into ``out`` (x itself for the in-place
    operator: the kernel gates each element right after reading it, sample by sample)."""
    k = _check_params("triplet_attention_inference", x, weights, {
        "gamma": [b[0] for b in bn], "beta": [b[1] for b in bn], "mean": [b[2] for b in bn], "var": [b[3] for b in bn]})
    lib = kernels.require("triplet_attention")
    xv, nhwc, (batch, c, h, w), flags, _, _ = _geometry(x, k)
    lanes = LANES[nhwc]
    lane_weights = [weights[branch].contiguous() for branch, _ in lanes]
    pointers = (ctypes.c_void_p * 12)(*[t.data_ptr() for branch, _ in lanes for t in bn[branch]])
    mask = sum(int(transposed) << lane for lane, (_, transposed) in enumerate(lanes))
    lib.ta_eval(xv.data_ptr(), batch, c, h, w, k, *[t.data_ptr() for t in lane_weights], pointers, eps, *flags, mask,
                _view(out)[0].data_ptr(), kernels.threads())


@define("mnv2::triplet_attention_inference", mutates_args=(), device_types="cpu")
def triplet_attention_inference(
        x: Tensor, w_cw: Tensor, w_hc: Tensor, w_s: Tensor,
        gamma_cw: Tensor, gamma_hc: Tensor, gamma_s: Tensor, beta_cw: Tensor, beta_hc: Tensor, beta_s: Tensor,
        mean_cw: Tensor, mean_hc: Tensor, mean_s: Tensor, var_cw: Tensor, var_hc: Tensor, var_s: Tensor, eps: float,
) -> Tensor:
    """Triplet Attention with BatchNorm's running statistics, one sample at a time while it is in cache."""
    out = torch.empty_like(x)
    _inference(x, (w_cw, w_hc, w_s), ((gamma_cw, beta_cw, mean_cw, var_cw), (gamma_hc, beta_hc, mean_hc, var_hc),
                                      (gamma_s, beta_s, mean_s, var_s)), eps, out)
    return out


@triplet_attention_inference.register_fake
def _(x, *args):
    return torch.empty_like(x)


@define("mnv2::triplet_attention_inference_", mutates_args=("x",), device_types="cpu")
def triplet_attention_inference_(
        x: Tensor, w_cw: Tensor, w_hc: Tensor, w_s: Tensor,
        gamma_cw: Tensor, gamma_hc: Tensor, gamma_s: Tensor, beta_cw: Tensor, beta_hc: Tensor, beta_s: Tensor,
        mean_cw: Tensor, mean_hc: Tensor, mean_s: Tensor, var_cw: Tensor, var_hc: Tensor, var_s: Tensor, eps: float,
) -> None:
    """``triplet_attention_inference`` written over x, for a tensor nobody else reads (a block's own
    intermediate): no new tensor."""
    _inference(x, (w_cw, w_hc, w_s), ((gamma_cw, beta_cw, mean_cw, var_cw), (gamma_hc, beta_hc, mean_hc, var_hc),
                                      (gamma_s, beta_s, mean_s, var_s)), eps, x)


@triplet_attention_inference_.register_fake
def _(x, *args):
    return None


def _conv_flops(x_shape, k: int) -> int:
    batch, c, h, w = x_shape
    return 2 * batch * (c * w + h * c + h * w) * 2 * k * k  # three 2->1 k x k convolutions


@register_flop_formula(torch.ops.mnv2.triplet_attention)
def _(x_shape, w_cw_shape, *args, **kwargs) -> int:
    return _conv_flops(x_shape, w_cw_shape[-1])


@register_flop_formula([torch.ops.mnv2.triplet_attention_inference, torch.ops.mnv2.triplet_attention_inference_])
def _(x_shape, w_cw_shape, *args, **kwargs) -> int:
    return _conv_flops(x_shape, w_cw_shape[-1])


@register_flop_formula(torch.ops.mnv2.triplet_attention_backward)
def _(grad_shape, x_shape, w_cw_shape, *args, **kwargs) -> int:
    return 2 * _conv_flops(x_shape, w_cw_shape[-1])  # gradients of the pooled maps and of the weights

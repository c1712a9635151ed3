"""Native operators in the ``mnv2`` namespace, over the C kernels of ``mnv2lib/csrc``.

Each operator is defined from a typed Python function (:mod:`.library`: ``torch.library.infer_schema``,
``Library.define`` and ``Library.impl``, the layer under ``torch.library.custom_op`` without its per-call
wrapper) with a typed schema, a fake (meta) implementation,
autograd registered (the backward is its own operator; operators without a formula refuse gradients with a
clear error, as ``custom_op``'s do) and a FLOP formula, so ``torch.compile``,
``torch.profiler`` and ``torch.utils.flop_counter`` see ``mnv2::...`` by name. Operators take
tensors and plain numbers, never modules. This package is the only place that builds, caches or
loads the C kernels (:mod:`.build`, :mod:`.kernels`).

- ``mnv2::mish``, ``mnv2::mish_backward``, ``mnv2::mish_`` (in place)
- ``mnv2::triplet_attention``, ``mnv2::triplet_attention_backward``, ``mnv2::triplet_attention_inference``,
  ``mnv2::triplet_attention_inference_`` (in place)
- ``mnv2::channel_stats``, ``mnv2::channel_stats_backward``, ``mnv2::selfnorm``, ``mnv2::selfnorm_backward``,
  ``mnv2::selfnorm_inference``, ``mnv2::selfnorm_inference_`` (in place), ``mnv2::batch_norm_update``

Python-defined operators over ctypes rather than a C++ ``TORCH_LIBRARY`` extension, by measurement on
the 2-core CI machine (numbers from the closing notes of issue 15): one call of
``mnv2::mish`` on a tiny tensor costs 7.3 us (5.3 us more than the raw ctypes call with its output
allocation; 10.5 us with autograd): some 100 calls, well under 1% of a benchmark training step; building
the three C libraries takes 6.4 s, while even a one-function C++ extension takes 17.6 s to build
(CI builds from scratch, and the kernels would have to be ported). Inside a network a call's Python
costs several times what a hot loop shows (the interpreter's code and data are evicted between calls):
with ``custom_op``'s wrapper, 0.55 ms of a 42 ms Triplet Attention forward; hence :mod:`.library`.
"""
from . import batch_norm, cnsn, mish, triplet  # noqa: F401  (registers the operators)
from .checks import is_channels_last, is_dense
from .kernels import available, kernel_backend, set_kernel_backend
from .library import refuse_gradients_where_unregistered

refuse_gradients_where_unregistered()  # after every operator module has registered its formulas

__all__ = ["available", "set_kernel_backend", "kernel_backend", "is_channels_last", "is_dense"]

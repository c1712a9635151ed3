"""Native operators in the ``mnv2`` namespace, over the C kernels of ``mnv2lib/ops/csrc``.

Every operator has a typed schema, a fake (meta) implementation, autograd (the backward is its own
operator; operators without a formula refuse gradients with a clear error) and a FLOP formula, so
``torch.compile``, ``torch.profiler`` and ``torch.utils.flop_counter`` see ``mnv2::...`` by name. Operators
take tensors and plain numbers, never modules. This package is the only place that builds, caches or
loads the native code (:mod:`.build`, :mod:`.kernels`).

- ``mnv2::mish``, ``mnv2::mish_backward``, ``mnv2::mish_`` (in place)
- ``mnv2::triplet_attention``, ``mnv2::triplet_attention_backward``, ``mnv2::triplet_attention_inference``,
  ``mnv2::triplet_attention_inference_`` (in place)
- ``mnv2::channel_stats``, ``mnv2::channel_stats_backward``, ``mnv2::selfnorm``, ``mnv2::selfnorm_backward``,
  ``mnv2::selfnorm_inference``, ``mnv2::selfnorm_inference_`` (in place)
- ``mnv2::batch_norm_act``, ``mnv2::batch_norm_act_backward`` (training BatchNorm2d + ReLU6 or Mish)

The operators of a library are C++ (``csrc/<name>_ops.cpp``: ``TORCH_LIBRARY`` schemas, argument checks,
allocation, autograd as a ``torch::autograd::Function``, as torchvision's ``csrc/ops``) around the C kernels of
``csrc/<name>.c``, defined when the library is first loaded (``available(name)``, as the modules do); their
fake kernels and FLOP formulas are registered from Python then (:mod:`.library`). C++ rather than Python
functions over ctypes, by measurement on the 2-core CI machine (closing notes of issue 15): inside a network
a call's Python costs several times what a hot loop shows (the interpreter's code and data are evicted
between calls); the Python glue and autograd wrapper of the 17 Triplet Attention calls cost some 25 ms of a
460 ms batch-128 training step, and in C++ the step is 35-40 ms shorter. The price is a C++ build against
torch's headers, some 15 s per library once per machine.
"""
from . import batch_norm_act, cnsn, mish, triplet  # noqa: F401  (registers the operators' Python parts)
from .kernels import available, kernel_backend, set_kernel_backend
from .layout import is_channels_last, is_dense

__all__ = ["available", "set_kernel_backend", "kernel_backend", "is_channels_last", "is_dense"]

"""Native operators in the ``mnv2`` namespace, over the C kernels of ``mnv2lib/csrc``.

Every operator has a typed schema, a fake (meta) implementation, autograd (the backward is its own
operator; operators without a formula refuse gradients with a clear error) and a FLOP formula, so
``torch.compile``, ``torch.profiler`` and ``torch.utils.flop_counter`` see ``mnv2::...`` by name. Operators
take tensors and plain numbers, never modules. This package is the only place that builds, caches or
loads the native code (:mod:`.build`, :mod:`.kernels`).

- ``mnv2::mish``, ``mnv2::mish_backward``, ``mnv2::mish_`` (in place)
- ``mnv2::triplet_attention``, ``mnv2::triplet_attention_backward``, ``mnv2::triplet_attention_inference``,
  ``mnv2::triplet_attention_inference_`` (in place): C++ (``csrc/triplet_attention_ops.cpp``), defined when
  their library is first loaded (``available("triplet_attention")``, as the module does)
- ``mnv2::channel_stats``, ``mnv2::channel_stats_backward``, ``mnv2::selfnorm``, ``mnv2::selfnorm_backward``,
  ``mnv2::selfnorm_inference``, ``mnv2::selfnorm_inference_`` (in place), ``mnv2::batch_norm_update``

Two ways to define them, chosen by measurement on the 2-core CI machine (closing notes of issue 15):
- Python functions over the C kernels (ctypes), defined at import by :mod:`.library` (the layer under
  ``torch.library.custom_op``, without its per-call wrapper): Mish and CNSN, whose calls take a few
  tensors. One call of ``mnv2::mish`` on a tiny tensor costs 7.3 us (5.3 us more than the raw ctypes
  call with its output allocation).
- C++ (``TORCH_LIBRARY``, autograd as a ``torch::autograd::Function``): Triplet Attention, whose calls
  take 18 tensors. Inside a network a call's Python costs several times what a hot loop shows (the
  interpreter's code and data are evicted between calls); the Python glue and autograd wrapper of its 17
  calls cost some 25 ms of a 460 ms batch-128 training step; in C++ the step is 35-40 ms shorter. The
  price is a C++ build against torch's headers, some 20 s once per machine.
"""
from . import batch_norm, cnsn, mish, triplet  # noqa: F401  (registers the operators)
from .checks import is_channels_last, is_dense
from .kernels import available, kernel_backend, set_kernel_backend
from .library import refuse_gradients_where_unregistered

refuse_gradients_where_unregistered()  # after every operator module has registered its formulas

__all__ = ["available", "set_kernel_backend", "kernel_backend", "is_channels_last", "is_dense"]

"""Activations, created by name: ``create_activation("mish")``.

The project's Mish is a custom autograd Function with a single-exponential
forward and backward, saving only its input. PyTorch's ``F.mish`` evaluates
softplus, tanh and (in backward) sigmoid separately, which on CPU costs about
nine times a ReLU6; no maintained library ships a faster CPU Mish, so it is
written here. The two elementwise kernels are compiled with ``torch.compile``
when that works on the machine, and run eagerly otherwise. In inference (no autograd
graph) ``Mish(inplace=True)``, as ``Conv2dNormActivation`` builds it, overwrites its
input like torchvision's in-place ReLU6, which spares a full-size allocation per layer.

:class:`NativeLibrary` compiles the C kernels of Triplet Attention and CNSN, with the
same fall-back: where no compiler is available the PyTorch implementations run.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import warnings
from typing import Callable

import torch
import torch.autograd.graph
from torch import nn
from torch.autograd.function import once_differentiable

# Above this the single-exponential form would overflow; mish(x) == x there to float precision.
_EXP_CLAMP = 20.0


def mish_reference(x: torch.Tensor) -> torch.Tensor:
    """The textbook definition, x * tanh(softplus(x)), for tests and benchmarks."""
    return x * torch.tanh(nn.functional.softplus(x))


def exporting() -> bool:
    """Export contract: under torch.export (ONNX dynamo, ExecuTorch), jit tracing (the legacy ONNX
    exporter) or scripting, the layers take their pure-PyTorch reference path, so that exporters see
    standard operators (no C kernels, autograd Functions or as_strided views)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()


def mish_compact(x: torch.Tensor) -> torch.Tensor:
    """Mish with one exponential, x * n / (n + 2), n = e^x (e^x + 2); x above 20 passes unchanged
    (where n would overflow). What exporters see: a handful of elementwise standard operators."""
    e = torch.exp(x)
    n = e * (e + 2.0)
    return torch.where(x > _EXP_CLAMP, x, x * n / (n + 2.0))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # half precision is computed in float32 (e^x overflows float16 at x > 11); float64 stays.
    return torch.promote_types(t.dtype, torch.float32)


def _mish_forward_math(x: torch.Tensor) -> torch.Tensor:
    # tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): one exponential.
    xf = x.to(_compute_dtype(x))
    e = torch.exp(torch.clamp(xf, max=_EXP_CLAMP))
    n = e * (e + 2.0)
    return (xf * n / (n + 2.0)).to(x.dtype)


def _mish_forward_inplace(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_mish_forward_math(x))


def _mish_backward_math(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # d/dx mish = t + x * sigmoid(x) * (1 - t^2), t = n / d, d = n + 2;
    # sigmoid(x) * (1 - t^2) = 4 e (e + 1) / d^2.
    xf = x.to(_compute_dtype(x))
    e = torch.exp(torch.clamp(xf, max=_EXP_CLAMP))
    d = e * (e + 2.0) + 2.0
    dy = (d - 2.0) / d + xf * (4.0 * e * (e + 1.0)) / (d * d)
    return (grad.to(xf.dtype) * dy).to(grad.dtype)


class _Kernels:
    """Forward/backward kernels: compiled on first use when possible, else eager."""

    def __init__(self) -> None:
        self.backend = os.environ.get("MNV2_KERNEL_BACKEND", os.environ.get("MNV2_MISH_BACKEND", "auto"))
        self._compiled: tuple[Callable, Callable] | None = None
        self._failed = False

    def get(self) -> tuple[Callable, Callable]:
        if self.backend == "eager" or self._failed:
            return _EAGER
        if self._compiled is None:
            self._compiled = tuple(torch.compile(fn, dynamic=True, fullgraph=True) for fn in _EAGER)
        return self._compiled

    def disable(self, error: Exception) -> None:
        if self.backend == "compiled":
            raise error
        self._failed = True
        warnings.warn(
            f"torch.compile is unavailable for Mish ({type(error).__name__}: {error}); "
            "using the eager single-exponential kernels, which are correct but slower.",
            RuntimeWarning,
            stacklevel=3,
        )


_EAGER = (_mish_forward_math, _mish_backward_math, _mish_forward_inplace)
_kernels = _Kernels()


def set_mish_backend(backend: str) -> None:
    """Choose how Mish runs: "auto" (compiled when possible), "compiled" or "eager"."""
    allowed = ("auto", "compiled", "eager")
    if backend not in allowed:
        raise ValueError(f"mish backend: got {backend!r}; allowed values are {allowed}")
    _kernels.backend = backend
    _kernels._failed = False


class NativeLibrary:
    """C kernels for the CPU: compiled once per machine with the system C compiler
    (``cc -O3 -march=native -fopenmp``, about a second) into a cache directory and
    loaded with ctypes. Used for float32 CPU tensors by Triplet Attention and CNSN, whose
    small single-output-channel convolutions and per-channel statistics PyTorch's CPU
    kernels handle poorly and ``torch.compile`` needs minutes to compile.

    ``get()`` returns the loaded library, or None where the backend is "eager" or no
    compiler / OpenMP is available (one warning); callers then use their pure-PyTorch
    path, which is also the path on CUDA and for other dtypes. The kernels run with
    ``torch.get_num_threads()`` threads of the OpenMP runtime that PyTorch itself uses.
    """

    instances: list["NativeLibrary"] = []
    backend = os.environ.get("MNV2_KERNEL_BACKEND", "auto")  # auto | compiled | eager

    def __init__(self, name: str, source: str, functions: dict[str, list]) -> None:
        NativeLibrary.instances.append(self)
        self.name, self.source, self.functions = name, source, functions
        self._lib = None
        self._failed = False

    def get(self):
        # under a dispatch mode (FLOP counting, profilers) the PyTorch ops run, so that the mode
        # sees them: work done in C is invisible to it
        if NativeLibrary.backend == "eager" or self._failed or torch._C._len_torch_dispatch_stack() > 0:
            return None
        if self._lib is None:
            try:
                self._lib = self._load()
            except Exception as error:  # noqa: BLE001 - no compiler, no OpenMP, read-only disk, ...
                if NativeLibrary.backend == "compiled":
                    raise
                self._failed = True
                warnings.warn(f"C kernels for {self.name} are unavailable ({type(error).__name__}: {error}); "
                              "using the PyTorch implementation, which is correct but slower.",
                              RuntimeWarning, stacklevel=3)
                return None
        return self._lib

    def _load(self):
        import ctypes
        import hashlib
        import platform
        import subprocess
        import tempfile
        from pathlib import Path

        compiler = os.environ.get("CC", "cc")
        flags = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
        machine = platform.machine() + platform.processor()
        try:  # -march=native: the binary belongs to this CPU model
            with open("/proc/cpuinfo") as f:
                machine += next((line for line in f if line.startswith("flags")), "")
        except OSError:
            pass
        key = hashlib.sha256("\0".join([self.source, compiler, *flags, machine]).encode()).hexdigest()[:20]
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        cache = Path(os.environ.get("MNV2_KERNEL_CACHE") or Path(tempfile.gettempdir()) / f"mnv2lib-kernels-{user}")
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"{self.name}-{key}.so"
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                source = Path(tmp) / f"{self.name}.c"
                source.write_text(self.source)
                built = Path(tmp) / library.name
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
                os.replace(built, library)  # atomic: concurrent builders agree
        lib = ctypes.CDLL(str(library))
        for function, argtypes in self.functions.items():
            getattr(lib, function).argtypes = argtypes
            getattr(lib, function).restype = None
        return lib


# A counter that every (re)registration of a parameter, buffer or submodule anywhere bumps
# (PyTorch's global registration hooks: attribute assignment, load_state_dict(assign=True),
# container item assignment), and modules that cache raw pointers bump in ``_apply``
# (.to(), .half(), ...). With it, such caches are revalidated by comparing one integer and
# the addresses of the cached tensors (catching ``.data =``), without walking the modules.
_GENERATION = [0]


def _bump_generation(*args) -> None:
    _GENERATION[0] += 1


def parameter_generation() -> int:
    return _GENERATION[0]


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_bump_generation)


class PointerCache:
    """Per-module cache of the raw pointers a C kernel reads (see ``_GENERATION``).

    ``get(module, build)``: ``build(module)`` returns (tensors, value, attributes), ``attributes``
    a tuple of (object, name) pairs whose values the value depends on (a BatchNorm's eps, say;
    never ``module`` itself, which the cache must not keep alive). The value is reused while no
    registration happened anywhere, every tensor still has the address it had and every
    attribute the value it had."""

    def __init__(self) -> None:
        import weakref

        self._entries = weakref.WeakKeyDictionary()

    def get(self, module, build):
        entry = self._entries.get(module)
        if entry is not None and entry[0] == _GENERATION[0] and all(
                t is None or t.data_ptr() == q for t, q in zip(entry[1], entry[2])) and all(
                getattr(obj, name) == v for obj, name, v in entry[4]):
            return entry[3]
        tensors, value, attributes = build(module)
        self._entries[module] = (_GENERATION[0], tensors, [None if t is None else t.data_ptr() for t in tensors],
                                 value, tuple((obj, name, getattr(obj, name)) for obj, name in attributes))
        return value


def set_kernel_backend(backend: str) -> None:
    """How the compiled kernels (Mish's, and the C kernels of Triplet Attention and CNSN) run:
    "auto" (compiled where possible), "compiled" (raise if compilation fails) or "eager"
    (pure PyTorch)."""
    set_mish_backend(backend)
    NativeLibrary.backend = backend
    for library in NativeLibrary.instances:
        library._failed = False


@contextlib.contextmanager
def pytorch_ops_only():
    """Within the block the C kernels step aside and every module runs its PyTorch ops, so that
    tools that count by module hooks (torchinfo's multiply-adds) see the attention convs."""
    previous = NativeLibrary.backend
    NativeLibrary.backend = "eager"
    try:
        yield
    finally:
        NativeLibrary.backend = previous


# Cephes' single-precision exponential (~1 ulp), as C that compilers vectorize (libm's expf call
# does not vectorize): shared by the C kernels of Mish, Triplet Attention and CNSN.
C_VEXPF = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
static inline __attribute__((always_inline)) float vexpf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof s);
    return y * s;
}
"""


# In-place inference Mish for float32 CPU tensors: the same single-exponential formula as a C
# kernel (a Cephes exponential, about 1 ulp), which spares torch.compile's per-call dispatch.
_MISH_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
typedef int64_t i64;

/* mish(v) = v * t / (t + 2), t = e (e + 2), e = exp(min(v, 20)) (0 below -87.3, as float's exp
 * underflows there, so that mish(-inf) is NaN like F.mish's); exp by Cephes' polynomial (~1 ulp) */
""" + C_VEXPF + r"""
static void mish_scalar(float* p, i64 m) {
#pragma omp simd
    for (i64 i = 0; i < m; i++) {
        const float v = p[i];
        const float e = v >= -87.3f ? vexpf(v < 20.f ? v : 20.f) : 0.f;
        const float t = e * (e + 2.f);
        p[i] = v * t / (t + 2.f);
    }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
static void mish_vector(float* p, i64 m) {  /* the same formula, 16 lanes (GCC's own vectorisation of it is ~1.5x slower) */
    const __m512 two = _mm512_set1_ps(2.f), lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(20.f);
    for (i64 i = 0; i < m; i += VW) {
        const __m512 v = _mm512_loadu_ps(p + i);
        const __m512 x = _mm512_max_ps(_mm512_min_ps(v, hi), lo);
        const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
        r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
        __m512 q = _mm512_set1_ps(1.9875691500e-4f);
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ),
            _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(q, r), r, r), _mm512_set1_ps(1.f)), n));
        const __m512 t = _mm512_mul_ps(e, _mm512_add_ps(e, two));
        _mm512_storeu_ps(p + i, _mm512_div_ps(_mm512_mul_ps(v, t), _mm512_add_ps(t, two)));
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
static void mish_vector(float* p, i64 m) {
    const __m256 two = _mm256_set1_ps(2.f), lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(20.f);
    for (i64 i = 0; i < m; i += VW) {
        const __m256 v = _mm256_loadu_ps(p + i);
        const __m256 x = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
        const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
        __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
        r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
        __m256 q = _mm256_set1_ps(1.9875691500e-4f);
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
        q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
        const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(q, r), r, r), _mm256_set1_ps(1.f));
        const __m256i k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        const __m256 e = _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(k)), _mm256_cmp_ps(v, lo, _CMP_GE_OQ));
        const __m256 t = _mm256_mul_ps(e, _mm256_add_ps(e, two));
        _mm256_storeu_ps(p + i, _mm256_div_ps(_mm256_mul_ps(v, t), _mm256_add_ps(t, two)));
    }
}
#else
#define VW 1
static void mish_vector(float* p, i64 m) { mish_scalar(p, m); }
#endif

void mish_inplace(float* x, i64 n, int nthreads) {
    const i64 chunk = 1 << 14;
    const i64 blocks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(blocks < nthreads ? (int)blocks : nthreads) schedule(static)
    for (i64 blk = 0; blk < blocks; blk++) {
        float* p = x + blk * chunk;
        const i64 m = n - blk * chunk < chunk ? n - blk * chunk : chunk;
        const i64 body = m / VW * VW;
        mish_vector(p, body);
        mish_scalar(p + body, m - body);
    }
}
"""
_mish_native = NativeLibrary("mish", _MISH_C_SOURCE, {"mish_inplace": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]})


def _call(kernel_index: int, *args: torch.Tensor) -> torch.Tensor:
    kernels = _kernels.get()
    # under a dispatch mode (FlopCounterMode, profilers) torch.compile refuses to run: that call
    # runs eagerly, the compiled kernels stay in use for the next ones
    if kernels is _EAGER or torch._C._len_torch_dispatch_stack() > 0:
        return _EAGER[kernel_index](*args)
    try:
        return kernels[kernel_index](*args)
    except Exception as error:  # noqa: BLE001 - compilation can fail in many ways
        if type(error).__name__ == "FailOnRecompileLimitHit":
            # too many (device, dtype, grad mode) variants of one kernel in this process: this call
            # runs eagerly, the variants already compiled stay compiled
            return _EAGER[kernel_index](*args)
        _kernels.disable(error)
        return _EAGER[kernel_index](*args)


def _run(kernel_index: int, *tensors: torch.Tensor) -> torch.Tensor:
    x = tensors[0]
    # The compiled kernels see a flat view of the storage, so one kernel serves every
    # shape and memory format (contiguous or channels_last) without recompiling.
    dense = all(_is_dense(t) and t.stride() == x.stride() for t in tensors)
    flat = [t.as_strided((t.numel(),), (1,)) for t in tensors] if dense else [t.reshape(-1) for t in tensors]
    out = _call(kernel_index, *flat)
    return out.as_strided(x.size(), x.stride()) if dense else out.view(x.shape)


def _is_dense(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and (
        t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    )


class _MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # only the input is kept for backward
        return _run(0, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if grad.stride() != x.stride():
            grad = grad.contiguous(memory_format=_memory_format(x))
        return _run(1, x, grad)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def mish(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Mish (Misra, 2019): x * tanh(softplus(x)), fast and memory-light.

    ``inplace=True`` overwrites ``x`` where no autograd graph is recorded (inference,
    ``torch.no_grad``); where one is, Mish must keep its input for backward, so the
    result is a new tensor either way and ``x`` is left alone.
    """
    if exporting():
        return mish_compact(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _MishFunction.apply(x)
    if inplace and _is_dense(x):
        lib = _mish_native.get() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if lib is not None:
            lib.mish_inplace(x.data_ptr(), x.numel(), torch.get_num_threads())
            if not x.is_inference():
                torch.autograd.graph.increment_version(x)  # written behind autograd's back
        else:
            _run(2, x)
        return x
    if _is_dense(x):
        return _run(0, x)
    return _run(0, x.contiguous())


class Mish(nn.Module):
    """Module form of :func:`mish`. ``inplace=True`` (what ``Conv2dNormActivation`` passes)
    overwrites the input in inference, like torchvision's ReLU6; in training the input is
    what backward needs, so it is kept and a new tensor is returned."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x, self.inplace)


class MishReference(nn.Module):
    """``torch.nn.functional.mish``: the baseline the fast Mish is benchmarked against."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.mish(x, inplace=self.inplace)


# name -> module class taking ``inplace``; the registry a config string picks from.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu6": nn.ReLU6,
    "relu": nn.ReLU,
    "mish": Mish,
    "mish_reference": MishReference,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
}


def activation_names() -> tuple[str, ...]:
    return tuple(_ACTIVATIONS)


def register_activation(name: str, module_class: type[nn.Module]) -> None:
    _ACTIVATIONS[name] = module_class


def get_activation_class(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: got {name!r}; allowed values are {activation_names()}")
    return _ACTIVATIONS[name]


def create_activation(name: str, inplace: bool = True) -> nn.Module:
    """An activation module by name; in-place where the module supports it (ReLU6 as torchvision)."""
    cls = get_activation_class(name)
    if cls is nn.GELU:
        return nn.GELU()
    return cls(inplace=inplace)

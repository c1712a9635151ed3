"""Building, caching and verifying the native libraries of ``mnv2lib/ops/csrc`` (the only place that does).

A library ``<name>`` is the C kernels of ``csrc/<name>.c`` (system C compiler, ``cc -O3 -march=native
-fopenmp``) linked with the C++ operators of ``csrc/<name>_ops.cpp`` (their schemas, argument checks,
allocations and autograd, registered with ``TORCH_LIBRARY``; ``c++ -std=c++20`` against the installed
torch's headers, some 15 s), compiled once per machine into the user's cache directory;
:mod:`.kernels` loads it once per process with ``torch.ops.load_library``.

- cache: ``$MNV2_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mnv2lib``, else ``~/.cache/mnv2lib``; created
  with mode 0700. A cache directory or library owned by another user, or writable by group or
  others, is refused (another local user could plant a shared object there): a warning, and the
  PyTorch implementations run.
- a build goes to a temporary name, its SHA-256 is written to a sidecar file, and both are renamed
  into place atomically; every load first checks the library against its sidecar, so a truncated or
  replaced file (which would crash the process with SIGBUS when mapped) is rebuilt instead.
- every build compiles with ``-Wall -Wextra`` and keeps the compilers' output in ``<library>.warnings``
  (:func:`warnings_log`); the test suite requires it to be empty.

The commands are built here rather than by ``torch.utils.cpp_extension.load``, whose build directory has
none of the cache's safety checks and which loads what it built before anything can verify it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from filelock import FileLock

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-std=gnu11"]
CXX_FLAGS = ["-O1", "-std=c++20", "-fPIC"]  # (checks and calls: -O2 builds a third longer)
# every build warns as a test would and keeps what the compilers said beside the library (warnings_log):
# the test suite reads it instead of compiling the C++ operators a second time (~70 s of one core)
WARNINGS = ["-Wall", "-Wextra"]


class UnsafeCacheError(RuntimeError):
    """The kernel cache directory or a library in it could be written by somebody else."""


def cache_dir() -> Path:
    """Where compiled kernels live (not created here)."""
    if os.environ.get("MNV2_KERNEL_CACHE"):
        return Path(os.environ["MNV2_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "mnv2lib"


def check_private(path: Path) -> None:
    """Raise :class:`UnsafeCacheError` unless ``path`` is owned by this user and not writable by others."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeCacheError(f"{path} is a symbolic link; the kernel cache must be a real directory")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeCacheError(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                               "allowed: writable by its owner only (chmod go-w)")


def private_cache_dir() -> Path:
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(directory)
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(name: str) -> tuple[Path, Path]:
    """``csrc/<name>.c`` (the C kernels) and ``csrc/<name>_ops.cpp`` (the C++ operators over them)."""
    return SOURCE_DIR / f"{name}.c", SOURCE_DIR / f"{name}_ops.cpp"


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib"


def _source_text(name: str) -> str:
    # the library's sources, every header in csrc (they are few and small) and the torch the operators are
    # compiled against: any change rebuilds
    texts = [source.read_text() for source in sources(name)]
    texts += [h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))]
    texts += [os.environ.get("CXX", "c++"), *CXX_FLAGS, *WARNINGS, torch.__version__, str(_torch_dirs()[0])]
    return "\0".join(texts)


def _machine() -> str:
    machine = platform.machine() + platform.processor()
    try:  # -march=native: the binary belongs to this CPU model
        with open("/proc/cpuinfo") as f:
            machine += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return machine


def library_path(name: str, directory: Path) -> Path:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_source_text(name), compiler, *FLAGS, _machine()]).encode()).hexdigest()[:20]
    return directory / f"{name}-{key}.so"


def _compile(command: list[str], what: str) -> str:
    """Run a compiler; its diagnostics (empty when it had nothing to say)."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed on {what}: {result.stderr.strip()[-2000:]}")
    return result.stderr


def compile_kernels(name: str, output: Path, extra_flags: tuple[str, ...] = ()) -> str:
    """``csrc/<name>.c`` into the object file ``output`` (``extra_flags`` after the project's: a later
    ``-march`` wins); the compiler's warnings."""
    kernels_source = sources(name)[0]
    return _compile([os.environ.get("CC", "cc"), *FLAGS, *WARNINGS, *extra_flags, f"-I{SOURCE_DIR}", "-c",
                     str(kernels_source), "-o", str(output)], f"csrc/{kernels_source.name}")


def compile_library(name: str, output: Path, extra_flags: tuple[str, ...] = ()) -> str:
    """``csrc/<name>.c`` and ``csrc/<name>_ops.cpp`` into the shared library ``output``; ``extra_flags`` go to
    both compilers. The compilers' warnings (``-Wall -Wextra``; not the linker's), empty for a clean build."""
    operators_source = sources(name)[1]
    include, lib = _torch_dirs()
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(prefix=f"mnv2-{name}-") as scratch:
        kernels, operators = Path(scratch) / f"{name}.o", Path(scratch) / f"{name}_ops.o"
        said = compile_kernels(name, kernels, extra_flags)
        # torch's headers as system headers: the warning flags are for this project's code
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
        said += _compile([cxx, *CXX_FLAGS, *WARNINGS, *extra_flags, abi, "-isystem", str(include),
                          "-isystem", str(include / "torch" / "csrc" / "api" / "include"), f"-I{SOURCE_DIR}",
                          "-c", str(operators_source), "-o", str(operators)], f"csrc/{operators_source.name}")
        _compile([cxx, "-shared", "-fopenmp", str(kernels), str(operators), "-o", str(output), f"-L{lib}",
                  f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-lm"], f"the {name} library")
    return said


def warnings_log(library: Path) -> Path:
    """What the compilers said while building ``library`` (written beside it; empty for a clean build)."""
    return library.with_name(library.name + ".warnings")


def _verified(library: Path) -> bool:
    """True when ``library`` and its sidecar exist, both are private, and the checksums agree."""
    sidecar = library.with_name(library.name + ".sha256")
    if not (library.exists() and sidecar.exists()):
        return False
    check_private(library)
    check_private(sidecar)
    return sidecar.read_text().strip() == sha256(library)


def build(name: str) -> Path:
    """The verified library file for ``csrc/<name>.c``, compiled when missing or damaged."""
    directory = private_cache_dir()
    library = library_path(name, directory)
    if _verified(library):
        return library
    # one build of a library at a time: another process wanting it (a second test worker, notebook kernel or
    # Ray worker) waits for this one's result instead of compiling the same thing beside it
    with FileLock(directory / f".{library.name}.lock"):
        if _verified(library):
            return library
        return _build(name, library)


def _build(name: str, library: Path) -> Path:
    directory = library.parent
    if library.exists():
        warnings.warn(f"kernel library {library} does not match its checksum (truncated or replaced): rebuilding",
                      RuntimeWarning, stacklevel=4)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=directory)
    os.close(fd)
    temporary = Path(temporary)
    sidecar_tmp = temporary.with_name(temporary.name + ".sha256")
    log_tmp = temporary.with_name(temporary.name + ".warnings")
    try:
        log_tmp.write_text(compile_library(name, temporary))
        sidecar_tmp.write_text(sha256(temporary) + "\n")
        os.chmod(temporary, 0o700)
        os.chmod(sidecar_tmp, 0o600)
        os.chmod(log_tmp, 0o600)
        # log and library first, then the checksum: a reader in between sees a mismatch and rebuilds too
        os.replace(log_tmp, warnings_log(library))
        os.replace(temporary, library)
        os.replace(sidecar_tmp, library.with_name(library.name + ".sha256"))
    finally:
        for leftover in (temporary, sidecar_tmp, log_tmp):
            leftover.unlink(missing_ok=True)
    if not _verified(library):
        raise RuntimeError(f"{library} changed while it was being installed")
    return library

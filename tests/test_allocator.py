"""Keeping freed memory in the process: no page faults for re-used big blocks, opt-out, clear errors."""
import os
import subprocess
import sys

import pytest

from mnv2lib.utils import allocator

# allocate and free 64 MiB a few times, then count the minor page faults of each of 5 more rounds
FAULTS = """
import resource, sys, torch
from mnv2lib.utils import allocator
mode = allocator.keep_freed_memory() if sys.argv[1] == "switch" else allocator.mode()
def one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
one_round(), one_round()
print(mode, *sorted(one_round() for _ in range(5)))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults(switch: bool, env: dict | None = None) -> tuple[str, int]:
    """The allocator mode and the median of 5 rounds' page faults (a round of its own may still grow the
    heap once, when a small allocation took the start of the freed block: 16,384 faults, seen in CI)."""
    result = subprocess.run([sys.executable, "-c", FAULTS, "switch" if switch else "leave"], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, check=True)
    mode, *faults = result.stdout.split()
    return mode, int(faults[2])


@glibc
def test_kept_memory_is_reused_without_page_faults():
    mode, kept = _faults(switch=True, env={allocator.ENV: "steady"})
    default_mode, default = _faults(switch=False)
    assert (mode, default_mode) == ("steady", "system")
    # 16,384 fresh pages per round with glibc's defaults; (almost) none once memory is kept
    assert default > 10_000
    assert kept < default / 20


@glibc
def test_system_allocator_is_left_alone_on_request():
    mode, faults = _faults(switch=True, env={allocator.ENV: "system"})
    assert mode == "system" and faults > 10_000


def test_importing_mnv2lib_changes_nothing():
    result = subprocess.run([sys.executable, "-c", "import mnv2lib, mnv2lib.experiments, mnv2lib.benchmarks.speed\n"
                             "from mnv2lib.utils import allocator; print(allocator.mode())"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "system"


def test_unknown_mode_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"MNV2_ALLOCATOR: got 'jemalloc'; allowed: steady, system"):
        allocator.requested()

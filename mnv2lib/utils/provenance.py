"""Where a result came from: the git commit of the working tree (with a mark when it has changes)."""
from __future__ import annotations

import subprocess

from . import paths


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=paths.PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

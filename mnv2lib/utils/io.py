"""Atomic writes: a temporary file beside the target and a rename, so readers never see a partial file
(a killed writer leaves only a hidden ``.<name>.<pid>.tmp``)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename."""
    import torch

    path = Path(path)
    tmp = _temporary(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

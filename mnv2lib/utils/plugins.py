"""Your own modules in every process: ``MNV2_PLUGINS=package.module[,other.module]`` names modules that
register activations or attention modules (``register_activation`` / ``register_attention``); importing
``mnv2lib.layers`` imports them, so the report runner, the notebook kernels and the executors' workers
(which inherit the environment) all know the names a factor or a config uses."""
from __future__ import annotations

import importlib
import os

PLUGINS_ENV_VAR = "MNV2_PLUGINS"


def plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(PLUGINS_ENV_VAR, "").split(",") if m.strip()]


def load_plugins() -> list[str]:
    """Import every module ``MNV2_PLUGINS`` names (once per process); an ImportError names the variable."""
    loaded = []
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"{PLUGINS_ENV_VAR}: cannot import {name!r} ({error}); allowed: importable module "
                              "names (on PYTHONPATH or installed), comma-separated") from error
        loaded.append(name)
    return loaded

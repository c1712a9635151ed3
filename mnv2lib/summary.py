"""Model summaries, built on torchinfo."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: bool):
    """Within the block ``model`` is in training (True) or eval (False) mode; its mode is restored after."""
    was_training = model.training
    model.train(mode)
    try:
        yield model
    finally:
        model.train(was_training)


def summary(model: nn.Module, input_size=(1, 3, 224, 224), depth: int = 3, verbose: int = 0, **kwargs):
    """torchinfo's summary (layers, output shapes, parameters, multiply-adds) in eval mode."""
    import torchinfo

    with training_mode(model, False):
        return torchinfo.summary(model, input_size=input_size, depth=depth, verbose=verbose,
                                 col_names=("output_size", "num_params", "mult_adds"), **kwargs)

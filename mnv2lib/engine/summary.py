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

    channels = getattr(model, "in_channels", None)
    if isinstance(input_size, (tuple, list)) and all(isinstance(d, int) for d in input_size) and (
            len(input_size) != 4 or min(input_size) < 1 or (channels is not None and input_size[1] != channels)):
        raise ValueError(f"input_size: got {tuple(input_size)}; allowed: (batch, {channels or 'channels'}, "
                         "height, width) with every size >= 1")
    with training_mode(model, False):
        try:
            return torchinfo.summary(model, input_size=input_size, depth=depth, verbose=verbose,
                                     col_names=("output_size", "num_params", "mult_adds"), **kwargs)
        except RuntimeError as error:  # torchinfo wraps the model's own clear error in a generic one
            if isinstance(error.__cause__, ValueError):
                raise error.__cause__ from None
            raise

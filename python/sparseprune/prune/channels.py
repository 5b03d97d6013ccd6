"""Structural (channel) pruning with dependency groups. (stub)"""


def prune_channels(model, example_inputs, ratio=0.5, **kwargs):
    raise NotImplementedError("prune_channels: not implemented yet")

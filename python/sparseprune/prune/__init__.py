"""Pruning: pattern pruning (masks kept) and structural pruning (channels removed)."""
from .patterns import prune_unstructured, prune_blocks, prune_nm  # noqa: F401
from .channels import prune_channels  # noqa: F401

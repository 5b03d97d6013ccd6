"""Pruning: pattern pruning (masks kept) and structural pruning (channels removed)."""
from .patterns import prune_unstructured, prune_blocks, prune_nm, select_layers, pattern_mask  # noqa: F401
from .masks import apply_masks, remove_masks, sync_masks, get_mask, is_masked, masked_modules  # noqa: F401
from .masks import sparsity, layer_sparsity  # noqa: F401
from . import masks  # noqa: F401
from .criteria import GradientScores  # noqa: F401
from .schedule import GradualPruner, cubic_sparsity, iterative_prune  # noqa: F401
from .regularize import group_lasso, bn_l1, l1_penalty, l2_penalty  # noqa: F401
from .search import Plan, search_plans, sensitivity  # noqa: F401
from .channels import prune_channels, ChannelPruner, ChannelPruneReport, ChannelPruneWarning  # noqa: F401
from .channels import register_channel_rule, unregister_channel_rule  # noqa: F401

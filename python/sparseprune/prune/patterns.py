"""Pattern pruning (unstructured, r x c blocks, N:M) with masks that survive training. (stub)"""


def prune_unstructured(model, sparsity, **kwargs):
    raise NotImplementedError("prune_unstructured: not implemented yet")


def prune_blocks(model, sparsity, block_size=(16, 16), **kwargs):
    raise NotImplementedError("prune_blocks: not implemented yet")


def prune_nm(model, n=2, m=4, **kwargs):
    raise NotImplementedError("prune_nm: not implemented yet")

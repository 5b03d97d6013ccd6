"""convert(): measured per-layer choice of dense / CSR / BSR. (stub)"""


def convert(model, example_inputs=None, **kwargs):
    raise NotImplementedError("convert: not implemented yet")


def summary(model, **kwargs):
    raise NotImplementedError("summary: not implemented yet")

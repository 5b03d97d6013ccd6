"""Safe save / load of converted models (safetensors + JSON metadata). (stub)"""


def save(model, path):
    raise NotImplementedError("save: not implemented yet")


def load(path, model):
    raise NotImplementedError("load: not implemented yet")

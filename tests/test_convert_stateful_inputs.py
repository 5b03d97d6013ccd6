"""Example inputs holding objects the model changes in place (a transformers KV cache grows on every call): convert
calls the model many times on them, so each call gets its own copy — otherwise the reference and the converted
outputs were computed on different caches (a ConversionError blaming the layers) and the user's cache came back
grown by every call."""
import pytest
import torch

import sparseprune as sp


def test_kv_cache_in_example_inputs(sparse_layers_win):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64)).eval()
    sp.prune_blocks(m, sparsity=0.9, block_size=(16, 16))
    with torch.no_grad():
        pkv = m(torch.randint(0, 100, (1, 10)), use_cache=True).past_key_values
    assert pkv.get_seq_length() == 10
    step = {"input_ids": torch.randint(0, 100, (1, 1)), "past_key_values": pkv}
    fast = sp.convert(m, step, time_budget=2.0)
    assert pkv.get_seq_length() == 10  # the user's cache as it was
    assert any(isinstance(x, sp.SparseLinear) and x.format != "dense" for x in fast.modules())
    with torch.no_grad():
        import copy
        want = m(**copy.deepcopy(step)).logits
        got = fast(**copy.deepcopy(step)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_plain_inputs_are_not_copied(monkeypatch):
    """Tensors and plain values go to the model as given (no copy per call)."""
    from sparseprune import _inputs
    seen = []

    class M(torch.nn.Module):
        def forward(self, x, scale=1.0, flags=None):
            seen.append(x)
            return x * scale

    x = torch.randn(3)
    _inputs.call_model(M(), {"x": x, "scale": 2.0, "flags": (True, None, "a")})
    assert seen[0] is x


def test_pruned_linear_subclass_left_dense_is_reported():
    """A subclass of nn.Linear with its own forward (Falcon's FalconLinear) is not converted: when its weight was
    pruned, convert says so (it was left dense without a word and the summary did not list it)."""

    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    torch.manual_seed(0)
    model = torch.nn.Sequential(MyLinear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    sp.prune_blocks(model, sparsity=0.75, block_size=(16, 16), dense_first_last=False)
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match=r"'0' \(MyLinear, a subclass of nn.Linear\) has a pruned weight"):
        fast = sp.convert(model, x, time_budget=1.0)
    assert type(fast[0]) is MyLinear
    dense_model = torch.nn.Sequential(MyLinear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unpruned subclass: nothing to say
        sp.convert(dense_model, x, time_budget=1.0, end_to_end=False)

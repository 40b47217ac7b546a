"""The models: shapes, causality, and that incremental decoding equals a full forward pass."""
import pytest
import torch

from pipeline.model import build_model, count_parameters
from pipeline.params import Model

V = 97


def make(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Model(arch=arch, n_layer=2, n_head=2, n_embd=32, n_hidden=48, block_size=16, **kw)
    return build_model(cfg, V).eval()


@pytest.mark.parametrize("arch", ["gpt", "lstm", "rnn"])
def test_forward_returns_logits_and_mean_cross_entropy(arch):
    model = make(arch)
    idx = torch.randint(V, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, V)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, V), idx.reshape(-1))
    assert torch.allclose(loss, expected)
    # An untrained model is close to uniform: loss near ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    assert model(idx)[1] is None


@pytest.mark.parametrize("arch", ["gpt", "lstm", "rnn"])
def test_prediction_at_a_position_ignores_later_tokens(arch):
    model = make(arch)
    a = torch.randint(V, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % V
    la, lb = model(a)[0], model(b)[0]
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-5)
    assert not torch.allclose(la[0, 10:], lb[0, 10:], atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "lstm", "rnn"])
def test_incremental_decoding_matches_full_forward(arch):
    model = make(arch)
    idx = torch.randint(V, (2, 12))
    full = model(idx)[0]
    logits, state = model.decode(idx[:, :5])  # prefill
    assert torch.allclose(logits, full[:, 4], atol=1e-5)
    for t in range(5, 12):
        logits, state = model.decode(idx[:, t:t + 1], state)
        assert torch.allclose(logits, full[:, t], atol=1e-4), t
    # Several new tokens at once after a cache (GPT: an offset causal mask).
    logits, _ = model.decode(idx[:, 8:12], model.decode(idx[:, :8])[1])
    assert torch.allclose(logits, full[:, 11], atol=1e-4)


def test_gpt_context_is_bounded_by_block_size():
    model = make("gpt")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_ties_embeddings_and_counts_them_once():
    model = make("gpt")
    assert model.lm_head.weight is model.wte.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


def test_dropout_only_acts_in_training_mode():
    model = make("gpt", dropout=0.5)
    idx = torch.randint(V, (2, 16))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])

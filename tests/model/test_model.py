"""The models: shapes, causality, and that incremental decoding equals a full forward pass."""

import pytest
import torch

from pipeline.core.params import ModelConfig as Model
from pipeline.decoding.cache import cache_for
from pipeline.model.model import build_model, count_parameters
from pipeline.training.loss import OutputLayer

V = 97


# Every architecture, and the GPT with each option on GPT-2's block (and the modern ones together;
# the default block is RoPE, RMSNorm and SwiGLU).
GPT2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}
VARIANTS = {
    "gpt": GPT2,
    "lstm": {},
    "gru": {},
    "rnn": {},
    "gpt-rope": {**GPT2, "positions": "rope"},
    "gpt-rmsnorm": {**GPT2, "norm": "rmsnorm"},
    "gpt-swiglu": {**GPT2, "mlp": "swiglu"},
    "gpt-relu2": {**GPT2, "mlp": "relu2"},
    "gpt-qknorm": {"qk_norm": True},
    "gpt-zero-init": {"zero_init_proj": True},
    "gpt-untied-bias": {**GPT2, "tie_embeddings": False, "bias": True},
    "gpt-modern": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "tie_embeddings": False},
}


def make(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {**VARIANTS.get(arch, {}), **kw}
    cfg = Model(arch=arch.split("-")[0], n_layer=2, n_head=2, n_embd=32, n_hidden=48, block_size=16, **kw)
    return build_model(cfg, V).eval()


@pytest.mark.parametrize("arch", VARIANTS)
def test_forward_returns_logits_and_mean_cross_entropy(arch):
    model = make(arch)
    idx, targets = torch.randint(V, (3, 16)), torch.randint(V, (3, 16))
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    # With gradients on, the same contract: logits and the same loss.
    grad_logits, grad_loss = model(idx, targets)
    assert grad_loss.requires_grad and torch.allclose(grad_logits, logits, atol=1e-5)
    assert torch.allclose(grad_loss, expected, atol=1e-5)
    # What training asks for: the same loss from its output layer (chunked on a CPU), and no logits.
    model.loss = OutputLayer()
    none, train_loss = model(idx, targets, return_logits=False)
    assert none is None and train_loss.requires_grad and torch.allclose(train_loss, expected, atol=1e-5)
    # An untrained model is close to uniform: loss near ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    assert model(idx)[1] is None


@pytest.mark.parametrize("arch", VARIANTS)
def test_prediction_at_a_position_ignores_later_tokens(arch):
    model = make(arch)
    a = torch.randint(V, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % V
    la, lb = model(a)[0], model(b)[0]
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-5)
    assert not torch.allclose(la[0, 10:], lb[0, 10:], atol=1e-5)


@pytest.mark.parametrize("arch", VARIANTS)
def test_incremental_decoding_matches_full_forward(arch):
    """Prefill, then one step per token, gives the full forward's logits; so does a prompt
    decoded in a batch beside longer ones (left-padded for a GPT, packed for a recurrent model)."""
    model = make(arch)
    idx = torch.randint(V, (2, 12))
    full = model(idx)[0]
    Cache = cache_for(model)  # pipeline.decoding.cache: a GPT's keys and values, or a recurrent state
    logits, cache = Cache.prefill(model, idx[:, :5].tolist(), 7)
    assert torch.allclose(logits, full[:, 4], atol=1e-5)
    for t in range(5, 12):
        logits = cache.step(model, idx[:, t])
        assert torch.allclose(logits, full[:, t], atol=1e-4), t
    short = idx[0, :3].tolist()
    logits, cache = Cache.prefill(model, [short, idx[1, :9].tolist()], 3)
    assert torch.allclose(logits[0], full[0, 2], atol=1e-5) and torch.allclose(logits[1], full[1, 8], atol=1e-5)
    logits = cache.step(model, idx[:, 3])  # the short row's next token, at its own position
    assert torch.allclose(logits[0], full[0, 3], atol=1e-4)


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


def test_gpt_options_build_the_named_layers():
    m = make("gpt-modern")
    assert m.wpe is None and m.lm_head.weight is not m.wte.weight
    assert isinstance(m.blocks[0].ln1, torch.nn.RMSNorm)
    assert m.blocks[0].mlp.fc.out_features == 2 * 128  # SwiGLU: gate and up, 8/3 * 32 rounded to 64
    g = make("gpt")
    assert isinstance(g.blocks[0].ln1, torch.nn.LayerNorm) and g.wpe is not None
    # GPT-2 initialisation: residual projections scaled down by sqrt(2 * layers).
    assert g.blocks[0].mlp.proj.weight.std().item() < 0.6 * g.blocks[0].mlp.fc.weight.std().item()


def test_rope_attention_scores_depend_only_on_relative_position():
    from pipeline.model.model import apply_rope, rope_tables

    cos, sin = rope_tables(8, 16)
    q, k = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)

    def scores(start):
        c, s = cos[start : start + 3], sin[start : start + 3]
        return apply_rope(q, c, s) @ apply_rope(k, c, s).transpose(-1, -2)

    assert torch.allclose(scores(0), scores(5), atol=1e-5)
    assert not torch.allclose(apply_rope(q, cos[0:3], sin[0:3]), apply_rope(q, cos[5:8], sin[5:8]))


@pytest.mark.parametrize("arch", ["gpt", "gpt-modern"])
def test_attention_dispatches_the_fused_kernel_not_the_math_fallback(arch):
    model = make(arch).train()
    idx = torch.randint(V, (2, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(idx, idx)[1].backward()
    names = {e.key for e in prof.key_averages()}
    assert any("_scaled_dot_product_flash_attention" in n for n in names), sorted(names)
    assert not any("_scaled_dot_product_attention_math" in n for n in names)
    assert any("_scaled_dot_product_flash_attention" in n and "backward" in n for n in names)


def test_flops_per_token_counts_matmul_parameters_and_attention():
    from pipeline.model.model import flops_per_token

    g = make("gpt")
    n_matmul = count_parameters(g) - g.wpe.weight.numel()  # the tied embedding counts once, as the head
    assert flops_per_token(g, 16) == 6 * n_matmul + 12 * 2 * 32 * 16
    u = make("gpt-untied-bias")
    assert (
        flops_per_token(u, 16)
        == 6 * (count_parameters(u) - u.wpe.weight.numel() - u.wte.weight.numel()) + 12 * 2 * 32 * 16
    )
    r = make("lstm")
    assert flops_per_token(r, 16) == 6 * (count_parameters(r) - r.embed.weight.numel())

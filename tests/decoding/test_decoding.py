"""Decoding any prompts in one batch (pipeline.decoding.decode): a batch of mixed-length prompts
gives what each prompt gives alone, for greedy, sampled and beam decoding, GPT (learned positions,
RoPE) and LSTM, and past the context's end, where the window slides."""

import pytest
import torch

from pipeline.core.common import PipelineError
from pipeline.core.params import ModelConfig
from pipeline.decoding.cache import KVCache, beam_attention
from pipeline.decoding.decode import Batch, Decoding, generate, next_tokens, stream
from pipeline.model.model import build_model

V, EOS = 50, 0
ARCHS = {
    "gpt-learned": dict(positions="learned", norm="layernorm", mlp="gelu"),
    "gpt-rope": dict(positions="rope"),
    "lstm": dict(arch="lstm"),
}


def model_of(name: str, block_size: int = 32):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_hidden=32, block_size=block_size, **ARCHS[name])
    return build_model(cfg, V).eval()


def mixed_prompts(n: int = 9) -> list[list[int]]:
    """Prompts of 1 to 20 tokens, in no order of length (eos never inside)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, V, (length,), generator=g).tolist() for length in [3, 7, 12, 1, 20, 5, 9, 16, 2][:n]]


DECODINGS = {
    "greedy": Decoding(12),
    "ratio": Decoding(12, max_ratio=1.0),  # each row its own limit of new tokens
    "penalties": Decoding(12, repetition_penalty=1.3, no_repeat_ngram=2),
    "beam": Decoding(12, beam_size=3),
    "beam-penalties": Decoding(12, beam_size=2, length_penalty=1.4, repetition_penalty=1.2, no_repeat_ngram=3),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("decoding", DECODINGS)
def test_a_batch_of_mixed_lengths_decodes_as_each_prompt_alone(arch, decoding):
    model, prompts, d = model_of(arch), mixed_prompts(), DECODINGS[decoding]
    # the model's own eos: a token it writes, so rows finish at different steps
    eos = generate(model, [prompts[0]], -1, Decoding(3))[0][-1]
    alone = [generate(model, [p], eos, d)[0] for p in prompts]
    assert generate(model, prompts, eos, d, batch_size=16) == alone
    assert generate(model, prompts, eos, d, batch_size=4) == alone  # and in several batches
    if d.max_ratio:
        assert all(len(a) <= len(p) for a, p in zip(alone, prompts))


@pytest.mark.parametrize("arch", ["gpt-learned", "gpt-rope"])
@pytest.mark.parametrize("beam_size", [1, 2])
def test_the_window_slides_past_the_context_row_by_row(arch, beam_size):
    """80 new tokens with a context of 16: each row's window slides when its own context is full
    (its last half re-encoded), the same in a batch of mixed lengths as alone."""
    model, prompts = model_of(arch, block_size=16), mixed_prompts()
    d = Decoding(80, beam_size=beam_size)
    alone = [generate(model, [p], -1, d)[0] for p in prompts]
    assert all(len(a) == 80 for a in alone)
    assert generate(model, prompts, -1, d, batch_size=16) == alone


def test_greedy_past_the_context_equals_recomputing_the_window():
    """The cache written in place, and its slide, against the plain definition: the full forward
    of the window at every step, the window cut to its last half when it is full."""
    model, prompt = model_of("gpt-rope", block_size=16), mixed_prompts()[4]  # 20 tokens: cut to 16
    window, expected = prompt[-16:], []
    with torch.no_grad():
        for _ in range(40):
            token = int(model(torch.tensor([window]))[0][0, -1].argmax())
            expected.append(token)
            window = (window + [token])[-8:] if len(window) >= 16 else window + [token]
    assert generate(model, [prompt], -1, Decoding(40))[0] == expected


def test_sampling_with_a_seed_is_reproducible():
    model, prompts = model_of("gpt-rope"), mixed_prompts()
    d = Decoding(15, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first = generate(model, prompts, EOS, d, batch_size=4)
    assert generate(model, prompts, EOS, d, batch_size=4) == first
    assert (
        generate(model, prompts, EOS, Decoding(15, temperature=1.0, top_k=20, top_p=0.9, seed=8), batch_size=4) != first
    )


def test_stream_yields_every_row_until_all_are_done():
    model, prompts = model_of("gpt-rope"), mixed_prompts(3)
    steps = torch.stack(list(stream(model, prompts, -1, Decoding(6))), dim=1).tolist()
    assert steps == generate(model, prompts, -1, Decoding(6))


def test_bad_decodings_are_one_line_errors():
    model = model_of("gpt-rope")
    with pytest.raises(PipelineError, match="empty prompt"):
        generate(model, [[1, 2], []], EOS, Decoding(4))
    with pytest.raises(PipelineError, match="beam_size"):
        generate(model, [[1]], EOS, Decoding(4, beam_size=0))
    with pytest.raises(PipelineError, match="temperature: must be a finite number"):
        generate(model, [[1]], EOS, Decoding(4, temperature=float("nan")))


def test_a_batch_out_of_gpu_memory_names_its_size_and_the_key(monkeypatch):
    model = model_of("gpt-rope")

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(KVCache, "prefill", oom)
    with pytest.raises(PipelineError, match=r"batch of 9 prompts x 2 beams; lower evaluate.decode_batch_size"):
        generate(model, mixed_prompts(), EOS, Decoding(4, beam_size=2), batch_size=16)


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_the_compiled_step_decodes_as_the_eager_one_and_compiles_once(decoding):
    """What CUDA graphs need (pipeline.decoding.decode.CompiledStep): a static cache attended over
    its whole width, written at a column the device holds, batches padded to one size. Compiled
    here by a backend that runs the captured graph as it is and counts captures: one per shape,
    never one per step (the window slides too: 40 tokens, a context of 32)."""
    from pipeline.decoding.decode import CompiledStep

    model, prompts = model_of("gpt-rope"), mixed_prompts(7)
    captures = []

    def backend(graph, example_inputs):
        captures.append(graph)
        return graph.forward

    step = CompiledStep(model, backend=backend)
    model.__dict__["_compiled_steps"] = {repr([]): step}  # what generate's CompiledStep.of(model) finds
    d = Decoding(40, beam_size=3 if decoding == "beam" else 1)
    eager = generate(model, prompts, EOS, d, batch_size=4)
    compiled = generate(model, prompts, EOS, d, batch_size=4, compile=True)
    assert compiled == eager and step.failed is None
    assert len(captures) == 1


def test_beam_attention_reads_the_prompt_once_and_equals_attention_over_every_column():
    """A prompt's beams share its columns (some rows left-padded): beam_attention, reading them once
    per prompt, equals the fused kernel over every column of every row with the padding masked."""
    g = torch.Generator().manual_seed(0)
    B, K, H, S, G, D = 3, 4, 2, 7, 5, 16
    q = torch.randn(B * K, H, 1, D, generator=g)
    k, v = (torch.randn(B * K, H, S + G, D, generator=g) for _ in range(2))
    for t in (k, v):  # the prompt's columns: the same in each of its beams
        t[:, :, :S] = t[::K, :, :S].repeat_interleave(K, 0)
    start = torch.tensor([0, 3, 6]).repeat_interleave(K)
    kv = KVCache([k.clone()], [v.clone()], start, True, block_size=S + G + 1)
    kv.advance(S)
    kv.share(K)  # the prompt's columns, then each beam's own
    kv.advance(G - 1)
    assert kv.begin(1).sharing and not kv.begin(2).sharing
    full = torch.zeros(B * K, 1, 1, S + G).masked_fill_(torch.arange(S + G) < start[:, None, None, None], float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full)
    torch.testing.assert_close(beam_attention(q, k, v, S, K, kv.begin(1).mask), expected)
    torch.testing.assert_close(
        kv.begin(1).attend(0, q, k[:, :, -1:], v[:, :, -1:]), expected
    )  # the one call attention makes


@pytest.mark.parametrize("arch", ["gpt-learned", "gpt-rope"])
def test_prompts_that_join_a_batch_as_it_decodes_decode_as_alone(arch):
    """Continuous batching (Batch.join, what the playground's engine does): prompts that arrive
    after a batch has written some tokens join it; every row's tokens equal its prompt alone."""
    model, prompts = model_of(arch, block_size=64), mixed_prompts()
    first, later = [prompts[4], prompts[7]], [prompts[0], prompts[3], prompts[2]]  # 20 and 16 tokens, then shorter
    limits = [20, 14, 9, 14, 12]  # (the batch has 40 columns: 20 + 20)
    alone = [generate(model, [p], EOS, Decoding(n))[0] for p, n in zip(first + later, limits)]
    with torch.inference_mode():
        batch = Batch(model, first, EOS, Decoding(20), limits[:2])
        for step in range(20):
            if step == 5:  # between a step's advance and the next write, as the engine joins
                assert not batch.fits(list(range(1, 40)), 5) and not batch.fits(later[0], 40)  # too long; no room
                assert all(batch.fits(p, n) for p, n in zip(later, limits[2:]))
                batch.join(later, limits[2:], 2)
            batch.write(next_tokens(batch, Decoding(20), None))
            batch.advance()
    assert [batch.ids(row) for row in range(5)] == alone and batch.rows.tolist() == [0, 1, 2, 3, 4]


class DtypesSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Every dtype of every tensor an aten operation returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen |= {t.dtype for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_nothing_runs_in_bfloat16_on_a_cpu(tmp_path):
    """A bfloat16 matmul takes tens of times as long as float32 on a CPU without native bfloat16
    (AVX2 only: most laptops). On a CPU, a training step with Muon (its orthogonalisation), a
    checkpoint saved in bfloat16 (as on a GPU) and then scored as evaluate scores and decoded as
    generate and the playground decode: not one operation gives a bfloat16 tensor."""
    from pipeline.core.params import Train
    from pipeline.evaluation.scoring import nats_of_range
    from pipeline.model.weights import load_model, save_weights
    from pipeline.training.optim import make_optimizer, train_step

    model = model_of("gpt-rope").train()
    optimizer = make_optimizer(model, Train(optimizer="muon"), torch.device("cpu"))
    x = torch.randint(1, V, (2, 16))
    with DtypesSeen() as training:
        train_step(model, optimizer, [(x, x)], 1e-3, 1.0, torch.autocast("cpu", enabled=False))
    assert torch.bfloat16 not in training.seen and torch.float32 in training.seen

    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_weights(bf16, model.cfg, tmp_path / "bf16.safetensors", vocab_size=V)
    loaded = load_model(tmp_path / "bf16.safetensors")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with DtypesSeen() as inference:
        nats_of_range(loaded, torch.randint(1, V, (200,)).numpy(), 1, 200, 4)
        generate(loaded, mixed_prompts(4), EOS, Decoding(8))
        generate(loaded, mixed_prompts(4), EOS, Decoding(8, beam_size=2))
        generate(loaded, mixed_prompts(4), EOS, Decoding(8, temperature=0.8, top_p=0.9, seed=1))
    assert torch.bfloat16 not in inference.seen and torch.float32 in inference.seen

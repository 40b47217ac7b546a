"""The training loss's output layer (pipeline.training.loss): the chunked cross-entropy of a CPU,
the plain path of CUDA and Liger's fused one give the mean cross-entropy and its gradients, IGNORE
targets left out."""

import pytest
import torch

V = 97


@pytest.mark.parametrize("chunked", [True, False])  # the CPU's path, and the CUDA one (plain, for compile)
@pytest.mark.parametrize("bias", [False, True])
def test_loss_only_output_layer_equals_the_plain_loss_and_gradients(bias, chunked, monkeypatch):
    from pipeline.training.loss import LinearCrossEntropy

    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 7)  # several chunks and a short last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=bias)
    x = torch.randn(3, 10, 16, requires_grad=True)
    y = torch.randint(V, (3, 10))
    plain = torch.nn.functional.cross_entropy(head(x).view(-1, V), y.view(-1))
    ref = torch.autograd.grad(plain * 2, [x, *head.parameters()])
    from pipeline.training.loss import output_layer

    logits, loss = output_layer(head, x, y, return_logits=False, chunked=chunked)
    assert logits is None and torch.allclose(loss, plain, atol=1e-6)
    got = torch.autograd.grad(loss * 2, [x, *head.parameters()])
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-6)
    logits, loss = output_layer(head, x, y)  # the plain contract: logits and the same loss, with gradients
    assert logits.shape == (3, 10, V) and torch.allclose(loss, plain, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss * 2, [x, *head.parameters()]), ref):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_ignored_targets_are_left_out_of_the_loss_and_its_gradients(bias, chunked, monkeypatch):
    """A pair's source, when the loss is on the targets only: IGNORE targets count nowhere, in both
    output paths, as in F.cross_entropy's ignore_index (a chunk of only ignored rows included)."""
    from pipeline.model.model import IGNORE
    from pipeline.training.loss import LinearCrossEntropy, output_layer

    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=bias)
    x = torch.randn(3, 10, 16, requires_grad=True)
    y = torch.randint(V, (3, 10))
    y[0, :9] = IGNORE  # the first chunk (7 rows) ignored whole, the second in part
    y[2, 4] = IGNORE
    counted = y != IGNORE
    plain = torch.nn.functional.cross_entropy(head(x)[counted], y[counted])  # only the counted rows
    ref = torch.autograd.grad(plain, [x, *head.parameters()])
    for return_logits in (False, True):
        _, loss = output_layer(head, x, y, return_logits=return_logits, chunked=chunked)
        assert torch.allclose(loss, plain, atol=1e-6), return_logits
        for a, b in zip(torch.autograd.grad(loss, [x, *head.parameters()]), ref):
            assert torch.allclose(a, b, atol=1e-6), return_logits
    # a batch with no target that counts (a window inside a source): loss 0 and no gradient, not NaN
    _, none = output_layer(head, x, torch.full_like(y, IGNORE), return_logits=False, chunked=chunked)
    assert none.item() == 0.0 and torch.equal(torch.autograd.grad(none, x)[0], torch.zeros_like(x))
    assert torch.equal(
        torch.autograd.grad(output_layer(head, x, y, return_logits=False, chunked=chunked)[1], x)[0][0, :9],
        torch.zeros(9, 16),
    )  # no gradient reaches the ignored positions


def test_the_liger_fused_loss_is_called_for_the_sum_and_divided_by_the_targets_that_count(monkeypatch):
    """train.fused_loss: liger, wired through output_layer. Liger-Kernel runs only on CUDA, so a
    stand-in with its interface (LigerFusedLinearCrossEntropyLoss(ignore_index, reduction)(weight,
    x, targets, bias)) computing what it computes checks the call: the same loss and gradients as
    the plain path, IGNORE targets left out, and 0 (not NaN) when none counts."""
    import sys
    import types

    from pipeline.model.model import IGNORE
    from pipeline.training.loss import output_layer

    calls = []

    class StandIn(torch.nn.Module):
        def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, weight, x, target, bias=None):
            calls.append((x.shape, self.ignore_index, self.reduction))
            logits = torch.nn.functional.linear(x, weight, bias)
            return torch.nn.functional.cross_entropy(
                logits, target, ignore_index=self.ignore_index, reduction=self.reduction
            )

    leaf = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    leaf.LigerFusedLinearCrossEntropyLoss = StandIn
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, leaf.__name__, leaf)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=True)
    x = torch.randn(3, 10, 16, requires_grad=True)
    y = torch.randint(V, (3, 10))
    y[0, :4] = IGNORE
    _, plain = output_layer(head, x, y, return_logits=True)
    logits, fused = output_layer(head, x, y, return_logits=False, fused="liger")
    assert logits is None and calls == [((30, 16), IGNORE, "sum")]
    assert torch.allclose(fused, plain, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(fused, [x, *head.parameters()]), torch.autograd.grad(plain, [x, *head.parameters()])
    ):
        assert torch.allclose(a, b, atol=1e-6)
    _, none = output_layer(head, x, torch.full_like(y, IGNORE), return_logits=False, fused="liger")
    assert none.item() == 0.0
    # logits asked for (evaluation, decoding): the plain head, never the fused loss
    assert output_layer(head, x, y, return_logits=True, fused="liger")[0].shape == (3, 10, V) and len(calls) == 2

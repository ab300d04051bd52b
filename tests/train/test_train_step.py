"""train_step: global token normalisation (accumulation = one big batch), errors, hooks, packed isolation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from centrifuge.models.presets import build_model, preset_config
from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.train.errors import NoCountedTokensError, NonFiniteLossError
from centrifuge.train.loop import lr_factor
from centrifuge.train.step import MicroLoss, StepHooks, dense_loss, evaluate, train_step

B, T, V = 4, 16, 128


def tiny_model(dtype=torch.float64):
    config = preset_config("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return build_model(config, dtype=dtype, seed=0)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX  # micro-batches with different label counts: mean-of-means would differ
    labels[2, 3:5] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX
    positions = torch.arange(T).repeat(B, 1)
    positions[1, 8:] = torch.arange(T - 8)  # a packed document boundary in row 1
    labels[1, 8] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": torch.ones_like(ids)}


def split(full, parts):
    size = B // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in full.items()} for i in range(parts)]


def grads_of_step(model, micro_batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}

    def capture(step):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

    stats = train_step(model, micro_batches, optimizer, None, step=1, max_grad_norm=None,
                       hooks=StepHooks(after_backward=[capture]))  # fmt: skip
    return captured, stats


class Float64LM(nn.Module):
    """A small causal LM that is float64 end to end (HF Llama's RMSNorm computes in float32)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 24, dtype=torch.float64)
        self.mix = nn.Linear(24, 24, dtype=torch.float64)
        self.head = nn.Linear(24, V, dtype=torch.float64)

    def forward(self, input_ids, position_ids, use_cache=False):
        h = self.embed(input_ids)  # [B, T, d]
        causal_mean = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return SimpleNamespace(logits=self.head(torch.tanh(self.mix(causal_mean)) + h))


@pytest.mark.parametrize("make_model", [Float64LM, tiny_model], ids=["float64", "hf-llama"])
def test_gradient_accumulation_equals_one_big_batch(make_model):
    model = make_model()
    full = batch()
    # reference: plain autograd on the mean CE over every labelled token of the whole batch
    ref = dense_loss(model, full)
    (ref.loss_sum / ref.num_counted).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # exact in float64; HF Llama runs its norms in float32, so there the tolerance is float32's
    tol = {"rtol": 1e-12, "atol": 1e-15} if isinstance(model, Float64LM) else {"rtol": 1e-5, "atol": 1e-7}
    for parts in (1, 2, 4):  # micro-batches hold 6..15 labelled tokens per row: a mean of means would differ
        grads, stats = grads_of_step(model, split(full, parts))
        assert stats.num_counted == int(ref.num_counted)
        assert math.isclose(stats.loss, float(ref.loss_sum.detach() / ref.num_counted), rel_tol=1e-12)
        for name, g in grads.items():
            torch.testing.assert_close(g, reference[name], **tol, msg=f"{parts} parts: {name}")


def test_packed_documents_do_not_see_each_other():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, V, (1, 6), generator=gen), torch.randint(1, V, (1, 10), generator=gen)

    def one(ids, positions, labels):
        return {"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": torch.ones_like(ids)}

    lab_a, lab_b = a.clone(), b.clone()
    lab_a[0, 0] = lab_b[0, 0] = IGNORE_INDEX
    packed = one(torch.cat([a, b], 1), torch.cat([torch.arange(6), torch.arange(10)])[None],
                 torch.cat([lab_a, lab_b], 1))  # fmt: skip
    with torch.no_grad():
        together = dense_loss(model, packed)
        apart = [dense_loss(model, one(x, torch.arange(x.shape[1])[None], y)) for x, y in ((a, lab_a), (b, lab_b))]
    assert int(together.num_counted) == sum(int(m.num_counted) for m in apart) == 14
    torch.testing.assert_close(together.loss_sum, apart[0].loss_sum + apart[1].loss_sum, rtol=1e-12, atol=0)


def test_non_finite_loss_raises_naming_the_step_and_does_not_step():
    model = tiny_model(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)

    def nan_loss(model, batch):
        micro = dense_loss(model, batch)
        micro.loss_sum = micro.loss_sum * float("nan")
        return micro

    with pytest.raises(NonFiniteLossError, match="at step 7"):
        train_step(model, [batch()], optimizer, None, step=7, loss_fn=nan_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert optimizer.state == {} or all(not s for s in optimizer.state.values())


def test_zero_counted_tokens_is_an_error_not_a_skipped_step():
    model = tiny_model(torch.float32)
    empty = batch()
    empty["labels"][:] = IGNORE_INDEX
    with pytest.raises(NoCountedTokensError, match="step 3"):
        train_step(model, [empty], torch.optim.SGD(model.parameters(), lr=0.1), None, step=3)


def test_hooks_run_in_order_and_a_custom_loss_fn_sets_the_kept_fraction():
    model = tiny_model(torch.float32)
    calls = []
    hooks = StepHooks(
        before_forward=[lambda s: calls.append(("before_forward", s))],
        after_backward=[lambda s: calls.append(("after_backward", s))],
        after_optimizer_step=[lambda s: calls.append(("after_optimizer_step", s))],
    )

    def half_loss(model, batch):  # stands in for token filtering: only even positions count
        micro = dense_loss(model, batch)
        labels = batch["labels"].clone()
        labels[:, 1::2] = IGNORE_INDEX
        kept = dense_loss(model, {**batch, "labels": labels})
        return MicroLoss(kept.loss_sum, kept.num_counted, micro.num_valid, {"score": 2.0})

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    stats = train_step(model, split(batch(), 2), optimizer, scheduler, step=5, loss_fn=half_loss, hooks=hooks)
    assert calls == [("before_forward", 5), ("after_backward", 5), ("after_optimizer_step", 5)]
    assert 0.4 < stats.counted_fraction < 0.6 and stats.stats == {"score": 2.0}
    assert stats.lr == pytest.approx(5e-4) and optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert stats.num_tokens == B * T and stats.grad_norm > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("offset", [0, 1])
def test_a_known_global_count_scales_alike_and_a_wrong_one_is_refused(offset):
    """``MicroLoss.global_counted`` (what token filtering knows from the global mask) scales the gradients
    without waiting for the count: the right count gives the very step of a loss without it; a count that
    disagrees with the sum of the local ones is one error, and the optimizer does not step."""
    def with_global(model, batch):
        micro = dense_loss(model, batch)
        micro.global_counted = micro.num_counted + offset
        return micro

    stepped = {}
    for name, loss_fn in (("plain", dense_loss), ("known", with_global)):
        model = tiny_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        grads = {}
        record = StepHooks(after_backward=[lambda s, m=model, g=grads: g.update(
            {n: p.grad.clone() for n, p in m.named_parameters()})])
        if name == "known" and offset:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with pytest.raises(RuntimeError, match=r"global counted tokens \(\d+\) differ from the sum of the ranks"):
                train_step(model, split(batch(), 2), optimizer, None, step=1, loss_fn=loss_fn, hooks=record)
            assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
            return
        stats = train_step(model, split(batch(), 2), optimizer, None, step=1, loss_fn=loss_fn, hooks=record)
        stepped[name] = (stats, grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    (plain, plain_grads, plain_weights), (known, known_grads, known_weights) = stepped["plain"], stepped["known"]
    assert (known.loss, known.num_counted, known.grad_norm) == (plain.loss, plain.num_counted, plain.grad_norm)
    assert all(torch.equal(known_grads[n], g) for n, g in plain_grads.items())
    assert all(torch.equal(known_weights[n], w) for n, w in plain_weights.items())


def test_evaluate_matches_dense_loss_and_restores_train_mode():
    model = tiny_model()
    full = batch()
    loss, tokens = evaluate(model, split(full, 2))
    ref = dense_loss(model, full)
    assert tokens == int(ref.num_counted)
    assert loss == pytest.approx(float(ref.loss_sum.detach()) / tokens, rel=1e-12)
    assert model.training


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_fused_dense_loss_is_dense_loss_sum_and_gradient():
    """``model.liger``'s loss goes through the model's own loss with ``num_items_in_batch=1``: on an unpatched
    model (HF's loss, the CPU stand-in for Liger's fused one) it is the same SUM and gradient as dense_loss."""
    from centrifuge.train.step import fused_dense_loss

    data = batch(seed=3)
    grads = []
    for fn in (dense_loss, fused_dense_loss):
        model = tiny_model()
        micro = fn(model, data)
        micro.loss_sum.backward()
        grads.append([p.grad for p in model.parameters()])
        assert int(micro.num_counted) == int((data["labels"][:, 1:] != IGNORE_INDEX).sum())
        if fn is dense_loss:
            expected = micro.loss_sum.detach()
        else:
            torch.testing.assert_close(micro.loss_sum.detach(), expected.float(), rtol=1e-5, atol=1e-5)
    for g_dense, g_fused in zip(*grads, strict=True):  # HF's loss casts float64 logits to float32: fp32 tolerances
        torch.testing.assert_close(g_fused, g_dense, rtol=1e-4, atol=1e-6)


def test_liger_refuses_neuron_omission(monkeypatch):
    """model.liger with omission: one error naming both keys (checked before anything is built)."""
    from centrifuge.train.config import load_config
    from centrifuge.train.errors import ConfigError
    from centrifuge.train.loop import check_liger

    monkeypatch.setattr("centrifuge.models.liger.liger_available", lambda: None)
    config = load_config(None, ["model.liger=true", "neurons.rate=0.5"])
    with pytest.raises(ConfigError, match=r"model.liger: neuron omission .* neurons.rate=0 or model.liger=false"):
        check_liger(config, torch.device("cuda"))
    check_liger(load_config(None, ["model.liger=true"]), torch.device("cuda"))  # alone: accepted
    monkeypatch.setattr("centrifuge.models.liger.liger_available", lambda: "liger-kernel is not importable (x)")
    with pytest.raises(ConfigError, match="model.liger: liger-kernel is not importable"):
        check_liger(load_config(None, ["model.liger=true"]), torch.device("cuda"))

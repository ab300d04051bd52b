"""``centrifuge.apply(model, compile=True)``: the element-wise pieces of the token-sparse layers through
``torch.compile`` — equal to the eager path, no graph breaks, no recompiles as the kept count changes."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, grads_of, max_rel_err, run_mode, tiny_model

import centrifuge
from centrifuge.ops import elementwise


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    elementwise._compiled.cache_clear()
    yield
    torch._dynamo.reset()
    elementwise._compiled.cache_clear()


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_equals_eager_and_reference_without_recompiles(model_type, gen):
    model = tiny_model(model_type)
    seen = []
    for step, (rows, ratio) in enumerate([(2, 0.5), (3, 0.3), (2, 0.8)]):  # kept counts differ every step
        ids = torch.randint(0, VOCAB, (rows, 23), generator=gen)
        keep = torch.rand(rows, 23, generator=gen) < ratio
        compiled_out, compiled = run_mode(model, "fast", compile=True, input_ids=ids, labels=ids, keep_mask=keep)
        _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
        # HF's RMSNorm computes in float32 even in a float64 model; compiled, its float32 reduction is ordered
        # differently, so the agreement is float32's (~1e-7), not float64's.
        assert max_rel_err(compiled, ref) < 2e-6
        seen.append(_unique_graphs())
        if step == 0:
            eager_out, _ = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
            assert torch.allclose(compiled_out.loss, eager_out.loss, rtol=1e-6, atol=0)
    assert seen[0] > 0 and seen[2] == seen[1]  # graphs compiled once (the first steps), then reused


def test_each_piece_is_one_graph_and_matches_the_hf_module():
    """fullgraph=True would raise on a graph break; the formulas equal the HF modules'."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(24, eps=1e-5).double()
    norm.weight.data = torch.randn(24, generator=gen, dtype=torch.float64)
    for rows in (5, 9, 17):
        x = torch.randn(rows, 24, generator=gen, dtype=torch.float64)
        assert torch.equal(elementwise.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
        q, k = torch.randn(rows, 4, 8, dtype=torch.float64), torch.randn(rows, 2, 8, dtype=torch.float64)
        cos, sin = torch.randn(rows, 8, dtype=torch.float64), torch.randn(rows, 8, dtype=torch.float64)
        for got, want in zip(elementwise.rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1),
                             strict=True):
            assert torch.equal(got, want)
    explained = torch._dynamo.explain(elementwise.swiglu)(torch.randn(7, 5), torch.randn(7, 5))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _break_count(layers: int, gen) -> int:
    torch._dynamo.reset()
    model = tiny_model("llama", layers=layers)
    ids = torch.randint(0, VOCAB, (2, 32), generator=gen)
    keep = torch.rand(2, 32, generator=gen) < 0.5
    centrifuge.apply(model, compile=True)
    explained = torch._dynamo.explain(lambda i, k: model(input_ids=i, labels=i, keep_mask=k).loss)(ids, keep)
    return explained.graph_break_count


def test_compiling_a_patched_model_breaks_only_in_the_per_forward_setup(gen):
    """``torch.compile(model)`` on a patched model: the graph breaks (host syncs for the token layout and
    the kept count) do not grow with the number of layers, i.e. none is in the layer hot path."""
    assert _break_count(2, gen) == _break_count(4, gen)


def test_torch_compile_of_a_patched_model_gives_the_same_gradients(gen):
    model = tiny_model("qwen2")
    ids = torch.randint(0, VOCAB, (2, 29), generator=gen)
    keep = torch.rand(2, 29, generator=gen) < 0.5
    centrifuge.apply(model, compile=False)
    model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
    eager = grads_of(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
    assert max_rel_err(grads_of(model), eager) < 1e-12

"""The token-sparse step's host reads, held to a budget (on a GPU each is a stream synchronisation, and the step
is host-bound). Counted on the CPU by ``centrifuge.bench.syncs``; the math attention backend (CPU only; the
GPU's Triton backend reads nothing back) is left out of the count."""

from __future__ import annotations

import pytest
import torch
from token_models import tiny_model

import centrifuge
from centrifuge.bench.syncs import HostSyncs
from centrifuge.tokens import selectors
from centrifuge.tokens.layout import TokenLayout


def _outside_math_attention(syncs: HostSyncs) -> list[str]:
    return [f"{r.kind} @ {r.site}" for r in syncs.records if not r.site.startswith("ops/attention.py")]


def _inputs(gen, B=3, T=29, packed=False):
    ids = torch.randint(0, 101, (B, T), generator=gen)
    pos = torch.arange(T).repeat(B, 1)
    if packed:  # documents restart at odd places
        pos[0, 11:] -= 11
        pos[2, 5:] -= 5
        pos[2, 20:] = torch.arange(T - 20)
    return ids, pos


@pytest.mark.parametrize("positions", ["none", "plain", "packed"])
@pytest.mark.parametrize("known", [True, False])
def test_a_token_sparse_step_reads_the_device_at_most_twice(gen, positions, known):
    model = tiny_model("llama", seed=3)
    ids, pos = _inputs(gen, packed=positions == "packed")
    keep = torch.rand(ids.shape, generator=gen) < 0.43
    centrifuge.apply(model, attention="math")
    try:
        kwargs = {"keep_mask": keep} if known else {"select": lambda *, scores, valid: keep & valid}
        with HostSyncs() as syncs:
            out = model(input_ids=ids, position_ids=None if positions == "none" else pos, use_cache=False, **kwargs)
            out.loss.backward()
    finally:
        centrifuge.revert(model)
    reads = _outside_math_attention(syncs)
    # one for the kept / counted totals (``_resolve_keep``), one for where documents start when position ids are
    # given (plain rows are known from the shape)
    where = sorted((r.split(" @ ")[1].split(":")[0], r.rsplit(" ", 1)[1]) for r in reads)  # (file, function)
    assert where == sorted([("tokens/forward.py", "_resolve_keep")]
                           + ([("tokens/layout.py", "build")] if positions != "none" else [])), reads
    assert all(p.grad is not None for p in model.parameters())


def test_plain_rows_build_their_layout_without_reading_the_device():
    with HostSyncs() as syncs:
        plain = TokenLayout.build(batch=3, seqlen=7, device=torch.device("cpu"))
    assert syncs.count == 0
    general = TokenLayout.build(batch=3, seqlen=7, device=torch.device("cpu"),
                                position_ids=torch.arange(7).repeat(3, 1))
    for field in ("segment", "index", "valid", "cu_seqlens"):
        assert torch.equal(getattr(plain, field), getattr(general, field)), field
    assert (plain.contiguous, plain.max_seqlen) == (general.contiguous, general.max_seqlen) == (True, 7)


def test_a_layout_read_once_matches_its_definition(gen):
    """Padding in the middle of a row (non-contiguous) and packed rows: segment ids, runs and lengths as the
    visibility rules define them, from the one host read."""
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 3:5] = 0  # a hole: row 0's real tokens are one segment in two runs
    with HostSyncs() as syncs:
        layout = TokenLayout.build(batch=2, seqlen=9, device=torch.device("cpu"), attention_mask=mask)
    assert syncs.count == 1
    assert not layout.contiguous
    vis = layout.visible(torch.arange(18), torch.arange(18))
    assert vis[5, 2] and not vis[5, 3] and not vis[9, 8]  # across the hole yes, padding no, other row no
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    layout = TokenLayout.build(batch=1, seqlen=9, device=torch.device("cpu"), position_ids=pos)
    assert layout.contiguous and layout.cu_seqlens.tolist() == [0, 3, 5, 9] and layout.max_seqlen == 4
    assert layout.segment.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_random_selection_reads_nothing_and_scored_selection_reads_once(gen):
    valid = torch.rand(4, 13, generator=gen) < 0.8
    with HostSyncs() as syncs:
        selectors.random(0.37, scope="batch", seed=1)(valid=valid, step=3)
    assert syncs.count == 0
    scores, reference = torch.rand(4, 13, generator=gen), torch.rand(4, 13, generator=gen)
    with HostSyncs() as syncs:
        selectors.excess_loss(0.37)(scores=scores, valid=valid, reference=reference)
    assert syncs.count == 1
    reference[~valid] = float("nan")  # NaN where nothing is labelled is fine; at a labelled position it is not
    selectors.excess_loss(0.37)(scores=scores, valid=valid, reference=reference)
    reference[valid.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(ValueError, match="reference losses contain NaN"):
        selectors.excess_loss(0.37)(scores=scores, valid=valid, reference=reference)


def test_the_counter_sees_each_kind_of_read():
    x = torch.tensor([1.0, 0.0, 2.0])
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]
        x.tolist()
        x.cpu()
        torch.unique(x)
    assert [r.kind for r in syncs.records] == ["item", "item", "nonzero", "bool_index", "tolist", "cpu", "unique"]
    assert all(r.site.endswith("test_the_counter_sees_each_kind_of_read") for r in syncs.records)
    assert torch.Tensor.tolist(x) == [1.0, 0.0, 2.0]  # restored on exit

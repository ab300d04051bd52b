"""Two CPU processes (gloo) training one step under DDP and FSDP2 give the one-process step on the same global
batch: the same normalized gradients (FSDP2's shards gathered), grad norm and updated weights.

Each rank builds the same float64 model, takes its half of every global micro-batch (``local_share``), and runs
``train_step`` with two accumulation micro-batches; the reference is ``train_step`` in this process on the whole
micro-batches. Selections: dense, token filtering with the mask known before the forward (random, per sequence)
and chosen after it (current loss, batch-scope top-k, which needs the global batch's scores on every rank)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig

import centrifuge
from centrifuge import neurons
from centrifuge.models.presets import build_model
from centrifuge.tokens import selectors
from centrifuge.tokens.training import TokenFilterLoss
from centrifuge.train import distributed
from centrifuge.train.loop import SignalVote
from centrifuge.train.step import StepHooks, dense_loss, train_step

CASES = ("dense", "keep_mask", "select", "neurons")  # neurons: keep_mask + neuron omission (optimizer protected)
B, T, ACCUM = 4, 16, 2  # global micro-batch of 4 sequences: 2 per rank


def tiny_model() -> torch.nn.Module:
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  max_position_embeddings=64)
    return build_model(config, dtype=torch.float64, seed=3)


def global_batches() -> list[dict[str, torch.Tensor]]:
    """ACCUM micro-batches [B, T]: two packed documents per row (restarting positions), a few unlabelled."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(ACCUM):
        ids = torch.randint(0, 128, (B, T), generator=gen)
        labels = ids.masked_fill(torch.rand(B, T, generator=gen) < 0.15, -100)
        cut = 6
        pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(B, T).contiguous()
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos,
                    "attention_mask": torch.ones(B, T, dtype=torch.long)})
    return out


def loss_for(case: str):
    if case == "dense":
        return dense_loss
    selector = selectors.self_loss(0.4, scope="batch") if case == "select" else selectors.random(0.5, seed=5)
    loss = TokenFilterLoss(selector=selector, dense_loss=dense_loss, total_steps=1, across_ranks=True)
    loss.set_step(0)
    return loss


def one_step(model, train_model, case: str, batches, full_grad, events: list | None = None) -> dict[str, torch.Tensor]:
    """One train_step; returns the normalized gradients, the grad norm and the weights after the step.
    ``events`` (when given) receives "after_backward" when the gradients have been scaled."""
    if case != "dense":
        centrifuge.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    grads = {}
    before_forward = []
    if case == "neurons":  # as centrifuge train's plug-ins: after wrapping, after centrifuge.apply
        omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16, total_steps=1)
        omitter.protect(optimizer)
        before_forward.append(lambda step: omitter.plan(step - 1))

    def record(step):
        grads.update({f"grad/{n}": full_grad(p.grad) for n, p in model.named_parameters()})
        if events is not None:
            events.append("after_backward")

    stats = train_step(train_model, batches, optimizer, None, step=1, loss_fn=loss_for(case), max_grad_norm=0.05,
                       hooks=StepHooks(before_forward=before_forward, after_backward=[record]))
    weights = {f"weight/{n}": full_grad(p.detach()) for n, p in model.named_parameters()}
    return {**grads, **weights, "grad_norm": torch.tensor(stats.grad_norm), "loss": torch.tensor(stats.loss),
            "counted": torch.tensor(stats.num_counted)}


class CollectiveLog:
    """Wraps ``dist.all_reduce`` in this process: logs "all_reduce" / "all_reduce(async)" and, for async
    calls, "wait" when the caller waits for the result."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._original = dist.all_reduce

    def __enter__(self) -> CollectiveLog:
        def all_reduce(tensor, *args, async_op=False, **kwargs):
            self.events.append("all_reduce(async)" if async_op else "all_reduce")
            work = self._original(tensor, *args, async_op=async_op, **kwargs)
            if not async_op:
                return work
            log = self.events

            class Logged:
                def wait(self, *a, **k):
                    log.append("wait")
                    return work.wait(*a, **k)

            return Logged()

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original


def signal_votes(rank: int, info: distributed.Distributed) -> dict:
    """The loop's stop-signal vote (``SignalVote``): rank 1 has SIGTERM from its 3rd poll on, then a fresh
    vote sees no signal for 3 polls, and its ``final`` sees rank 0's SIGINT."""
    vote = SignalVote(info)
    seen = [vote.poll(signal.SIGTERM if rank == 1 and i >= 2 else None) for i in range(4)]
    again = SignalVote(info)
    quiet = [again.poll(None) for _ in range(3)]
    return {"seen": seen, "quiet": quiet, "last": again.final(signal.SIGINT if rank == 0 else None)}


def _worker(rank: int, store: str, out: str, strategy: str, knobs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        info = distributed.init_distributed(strategy, torch.device("cpu"))
        assert (info.rank, info.world_size, info.strategy) == (rank, 2, strategy)
        results, events = {}, {}
        for case in CASES:
            model = tiny_model()
            train_model = distributed.wrap_model(model, info, **knobs)
            share = [distributed.local_share(b, info) for b in global_batches()]
            full = (lambda t: t.full_tensor()) if strategy == "fsdp2" else (lambda t: t.clone())
            with CollectiveLog() as log:
                results[case] = one_step(model, train_model, case, share, full, log.events)
            events[case] = log.events
        votes = signal_votes(rank, info) if strategy == "ddp" else None
        torch.save({"results": results, "events": events, "votes": votes}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    results = {}
    for case in CASES:
        model = tiny_model()
        results[case] = one_step(model, model, case, global_batches(), lambda t: t.clone())
    return results


# FSDP2's knobs for a short backward (train.fsdp_reshard_after_forward / fsdp_prefetch) change only when the
# weights are all-gathered, never the gradients.
KNOBS = {"default": {}, "keep_gathered+prefetch2": {"reshard_after_forward": False, "prefetch": 2}}


@pytest.mark.parametrize(("strategy", "knobs"), [("ddp", "default"), ("fsdp2", "default"),
                                                 ("fsdp2", "keep_gathered+prefetch2")])
def test_two_ranks_equal_one_process(strategy, knobs, single_process, tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, strategy, KNOBS[knobs]), nprocs=2, join=True)
    saved = [torch.load(f"{out}.{r}") for r in range(2)]
    ranks = [s["results"] for s in saved]
    if strategy == "ddp":  # the stop-signal vote: asynchronous, read one poll later, the same on both ranks
        for rank in saved:
            assert rank["votes"]["seen"] == [None, None, None, signal.SIGTERM], rank["votes"]
            assert rank["votes"]["quiet"] == [None, None, None] and rank["votes"]["last"] == signal.SIGINT
    for rank in saved:
        # The step's collectives of all_reduce: with token filtering the global kept count is known from the
        # global mask, so the one all-reduce of the step's sums is async and waited for only after the
        # gradients were scaled (after_backward); dense training needs the count first (one blocking call).
        # (DDP / FSDP2 reduce gradients through their own reducers, not dist.all_reduce.)
        assert rank["events"]["dense"] == ["all_reduce", "after_backward"], rank["events"]["dense"]
        for case in ("keep_mask", "select", "neurons"):
            assert rank["events"][case] == ["all_reduce(async)", "after_backward", "wait"], rank["events"][case]
    for case in CASES:
        ref = single_process[case]
        assert ref["grad/model.layers.0.mlp.down_proj.weight"].abs().sum() > 0
        for rank in ranks:
            got = rank[case]
            assert got.keys() == ref.keys()
            assert int(got["counted"]) == int(ref["counted"]), case  # the global kept count
            for name, r in ref.items():
                scale = r.abs().max().item() or 1.0
                err = (got[name].double() - r.double()).abs().max().item() / scale
                assert err < 1e-10, (case, name, err)
    if True:  # the cases really differ (a test that compares equal things could not fail)
        ref = single_process
        assert int(ref["keep_mask"]["counted"]) < int(ref["dense"]["counted"])
        assert not torch.equal(ref["select"]["grad/lm_head.weight"], ref["dense"]["grad/lm_head.weight"])
        # neuron omission: omitted rows get no gradient and do not move (the protected optimizer), and the
        # neurons case differs from keep_mask alone
        down = "model.layers.0.mlp.down_proj.weight"
        zero_cols = (ref["neurons"][f"grad/{down}"] == 0).all(dim=0)
        assert int(zero_cols.sum()) == 48, int(zero_cols.sum())  # 96 channels, rate 0.5
        fresh = tiny_model().state_dict()[down]
        assert torch.equal(ref["neurons"][f"weight/{down}"][:, zero_cols], fresh[:, zero_cols])
        assert not torch.equal(ref["neurons"][f"weight/{down}"], fresh)


def test_one_process_signal_vote_returns_the_signal_at_once():
    vote = SignalVote(distributed.Distributed())
    assert vote.poll(None) is None and vote.poll(signal.SIGINT) == signal.SIGINT
    assert vote.final(None) is None

"""The ranks' stop-signal vote (``SignalVote``): asynchronous on its own gloo group, read one poll later, so all
ranks stop after the same step without a blocking collective per step; ``final`` collects the last vote."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from centrifuge.train.distributed import Distributed
from centrifuge.train.loop import SignalVote


def _worker(rank: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        info = Distributed(rank, 2, rank, "ddp")
        vote = SignalVote(info)
        # rank 1 receives SIGTERM before its 3rd poll; nobody has a signal before
        seen = [vote.poll(signal.SIGTERM if rank == 1 and i >= 2 else None) for i in range(4)]
        again = SignalVote(info)
        quiet = [again.poll(None) for _ in range(3)]
        last = again.final(signal.SIGINT if rank == 0 else None)  # a signal during the last step
        torch.save({"seen": seen, "quiet": quiet, "last": last}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_one_poll_later(tmp_path):
    out = str(tmp_path / "vote")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        # the vote launched at poll 2 (index) is read at poll 3: both ranks stop there
        assert got["seen"][:3] == [None, None, None] and got["seen"][3] == signal.SIGTERM, got["seen"]
        assert got["quiet"] == [None, None, None]
        assert got["last"] == signal.SIGINT


def test_one_process_returns_the_signal_at_once():
    vote = SignalVote(Distributed())
    assert vote.poll(None) is None and vote.poll(signal.SIGINT) == signal.SIGINT
    assert vote.final(None) is None

"""Two CPU processes (gloo DDP) under the HF Trainer: the gradient is normalized by the kept count of every
micro-batch on every rank, i.e. it equals one train_step over all ranks' micro-batches."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from integration_helpers import PackedRows, Recorder, max_rel_err, replay, tiny_model, training_args

import centrifuge
from centrifuge.tokens import selectors
from centrifuge.tokens.training import TokenFilterLoss
from centrifuge.train.step import StepHooks, dense_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from transformers import Trainer

    from centrifuge.integrations import enable_token_filtering

    recorder = Recorder()
    args = training_args(out_dir, ddp_backend="gloo", max_steps=1)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=PackedRows(8, seed=8), callbacks=[recorder])
    recorder.handle = enable_token_filtering(trainer, selector="self_loss", keep_ratio=0.5)
    recorder.wrap(trainer)
    try:
        trainer.train()
        torch.save({"batches": recorder.batches, "grads": recorder.grads, "counts": recorder.counts},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # as the other gloo tests do: left to interpreter exit, the group's teardown aborted a rank now and
        # then ("terminate called without an active exception", SIGABRT)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_ddp_normalizes_by_the_global_kept_count(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["counts"][0][0] == ranks[1]["counts"][0][0]  # the global count, on both ranks
    local = [sum(r["counts"][0][2]) for r in ranks]
    assert local[0] != local[1] and sum(local) == ranks[0]["counts"][0][0]  # ranks keep different counts
    assert max_rel_err(ranks[0]["grads"][0], ranks[1]["grads"][0]) == 0.0  # DDP's all-reduce

    model = centrifuge.apply(tiny_model())
    loss = TokenFilterLoss(selector=selectors.self_loss(0.5), dense_loss=dense_loss, total_steps=1)
    all_batches = [ranks[0]["batches"][0] + ranks[1]["batches"][0]]
    grads, _ = replay(model, all_batches, loss, lr=0.5,
                      hooks=StepHooks(before_forward=[lambda step: loss.set_step(step - 1)]))
    assert max_rel_err(ranks[0]["grads"][0], grads[0]) < 1e-12

"""Under torch.distributed, every rank uses rank 0's plan even though their statistics differ."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, store: str, out: str) -> None:
    from omission_helpers import batch, step_grads, tiny_model

    from centrifuge import neurons

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = tiny_model("llama")
        omitter = neurons.attach(model, rate=0.5, metric="activation", select="topk", multiple=16)
        step_grads(model, batch(seed=rank))  # different data per rank → different statistics
        plan = omitter.plan(1)
        local = omitter.layer_state(0).mlp_score.topk(64).indices.sort().values
        torch.save({"kept": plan.layers[0].channels, "local": local}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_share_rank_zero_plan(tmp_path):
    out = str(tmp_path / "plan")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert not torch.equal(r0["local"], r1["local"])  # the ranks' own choices differ ...
    assert torch.equal(r0["kept"], r1["kept"]) and torch.equal(r1["kept"], r0["local"])  # ... rank 0's is used

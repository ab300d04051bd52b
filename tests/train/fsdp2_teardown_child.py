"""Child of ``test_train_torchrun.test_fsdp2_process_group_is_torn_down_before_exit`` (run under torchrun):
one FSDP2 training step, then ``distributed.shutdown()``; exits 3 if gloo's threads outlived it."""

from __future__ import annotations

import os
import sys

import torch

from centrifuge.models.presets import build_model, preset_config
from centrifuge.train import distributed
from centrifuge.train.step import train_step


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def main() -> int:
    info = distributed.init_distributed("fsdp2", torch.device("cpu"))
    config = preset_config("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1)
    model = build_model(config, seed=0)
    train_model = distributed.wrap_model(model, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(info.rank))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16),
             "attention_mask": torch.ones_like(ids)}
    train_step(train_model, [batch], optimizer, None, step=1)  # DTensor ops: grad norm, AdamW on shards
    assert any("gloo" in name for name in thread_names()), "expected gloo threads while the group is up"
    del train_model, model, optimizer
    distributed.shutdown()
    left = [name for name in thread_names() if "gloo" in name]
    print(f"rank {info.rank}: gloo threads left after shutdown: {left}", flush=True)
    return 3 if left else 0


if __name__ == "__main__":
    sys.exit(main())

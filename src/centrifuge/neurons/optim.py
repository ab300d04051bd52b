"""Keep omitted weights still through an optimizer step.

An omitted row gets an exactly-zero gradient, but AdamW would still move it (momentum, and decoupled weight
decay) and decay its moment estimates. ``OptimizerMask`` registers a pre-step hook that saves the omitted
rows / columns of each affected parameter and of every optimizer-state tensor of the same shape (AdamW's
``exp_avg`` / ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``), and a post-step hook that
writes them back — so any optimizer (foreach or fused) leaves omitted units exactly as they were. State
tensors created by this very step (the first step) get zeros in the omitted rows, their value had the
optimizer never seen them. Per-parameter scalars (AdamW's ``step``) still count the step.

Not for sharded parameters (FSDP / ZeRO): the hooks index full parameter tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class OptimizerMask:
    """Save / restore omitted slices around ``optimizer.step()``; ``remove()`` takes the hooks off."""

    def __init__(self, omitter, optimizer: torch.optim.Optimizer):
        self.omitter = omitter
        self.optimizer = optimizer
        self._params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._saved: list = []
        self._pre = optimizer.register_step_pre_hook(self._before)
        self._post = optimizer.register_step_post_hook(self._after)
        omitter._masks.append(self)

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        self._saved = []
        for param, dim, ids in self.omitter.omitted_slices():
            if id(param) not in self._params:
                continue
            state = optimizer.state.get(param, {})
            had_state = bool(state)
            saved_state = {key: t.index_select(dim, ids) for key, t in state.items() if _same_shape(t, param)}
            self._saved.append((param, dim, ids, param.detach().index_select(dim, ids), had_state, saved_state))

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        for param, dim, ids, values, had_state, saved_state in self._saved:
            param.detach().index_copy_(dim, ids, values)
            state = optimizer.state.get(param, {})
            for key, t in state.items():
                if not _same_shape(t, param):
                    continue
                if key in saved_state:
                    t.index_copy_(dim, ids, saved_state[key])
                elif not had_state:
                    t.index_fill_(dim, ids, 0)
        self._saved = []
        self.omitter._optimizer_stepped()

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()
        if self in self.omitter._masks:
            self.omitter._masks.remove(self)


def _same_shape(t, param: nn.Parameter) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == param.shape

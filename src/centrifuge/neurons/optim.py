"""Keep omitted weights still through an optimizer step.

An omitted row gets an exactly-zero gradient, but AdamW would still move it (momentum, and decoupled weight
decay) and decay its moment estimates. ``OptimizerMask`` hooks ``optimizer.step()`` in one of two ways, per
parameter:

* **masked AdamW** (the fast path; ``torch.optim.AdamW`` / ``Adam``): the pre-step hook builds a keep vector
  for each parameter with omitted rows / columns, holds its gradient back (``param.grad = None``, so the
  stock step skips it), and the post-step hook updates only its kept rows / columns with
  ``centrifuge.ops.masked_adamw`` (on CUDA one Triton launch per param group and parameter shape, the torch
  reference elsewhere) using the parameter group's lr / betas / eps / weight decay, then gives the gradient
  back. State is created
  and counted exactly as torch does (``step``: a float32 tensor on the parameter's device for fused /
  capturable AdamW, else a CPU tensor of the default scalar dtype; ``exp_avg`` / ``exp_avg_sq`` like the
  parameter), so the optimizer, its ``state_dict`` and later unprotected steps are the stock ones. The math
  runs in float32 (float64 for float64 parameters) whatever the optimizer's foreach / fused choice: equal to
  the stock step up to rounding.
* **save / restore** (generic; any optimizer): the pre-step hook saves the omitted rows / columns of each
  affected parameter and of every optimizer-state tensor of the same shape (AdamW's ``exp_avg`` /
  ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``), the post-step hook writes them back — so
  any optimizer (foreach or fused) leaves omitted units exactly as they were, at the cost of a few small
  index kernels per parameter and state tensor.

Both: state tensors created by this very step (the first step) get zeros in the omitted rows, their value had
the optimizer never seen them; per-parameter scalars (AdamW's ``step``) still count the step.

The choice (``OptimizerMask(..., fast=None | True | False)``): ``False`` always saves / restores. ``None``
(auto) takes the masked path where it is exact — optimizer of type ``torch.optim.AdamW`` or
``torch.optim.Adam`` (either weight decay: decoupled or L2), every group with amsgrad, maximize and
differentiable off, no GradScaler ``grad_scale`` / ``found_inf`` on this step, no CUDA graph capture — and,
per parameter, a dense plain tensor (no DTensor or other subclass) of 1 or 2 dims, real floating point, with
a dense gradient and stock Adam state; everything else is saved / restored. ``True`` is auto that raises
(``ValueError`` at construction for an unsupported optimizer, ``RuntimeError`` in ``step()`` otherwise)
instead of falling back. ``fast_updates`` counts the parameter updates the masked path did.

If the stock step raises, the post-step hook does not run and held-back gradients stay ``None``.

FSDP2 (``DTensor`` parameters sharded by rows, ``Shard(0)``): the masked path does not apply (plain tensors
only); save / restore works on each rank's local shard, with the omitted row ids mapped into the rank's row
block (``_local_ids``) and column ids used as they are. Other sharded layouts (FSDP1, ZeRO, 2-D meshes) are
not supported: the hooks would index full tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from centrifuge.ops.masked_adamw import masked_adamw_multi_

_ADAM_TYPES = (torch.optim.AdamW, torch.optim.Adam)


def fast_path_unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` (type and group settings) cannot take the masked-AdamW path, or None if it can."""
    if type(optimizer) not in _ADAM_TYPES:
        return f"the masked path needs torch.optim.AdamW or torch.optim.Adam, got {type(optimizer).__qualname__}"
    for i, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize", "differentiable"):
            if group.get(flag, False):
                return f"the masked path does not support {flag}=True (param group {i})"
    return None


def _step_unsupported(optimizer: torch.optim.Optimizer, kwargs: dict) -> str | None:
    """Why this particular ``step()`` call cannot take the masked path, or None."""
    why = fast_path_unsupported(optimizer)
    if why:
        return why
    for name in ("grad_scale", "found_inf", "grad_scaler"):
        if getattr(optimizer, name, None) is not None or kwargs.get(name) is not None:
            return f"the masked path does not support a GradScaler step ({name} set)"
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return "the masked path does not support CUDA graph capture"
    return None


def _param_unsupported(param: nn.Parameter) -> str | None:
    """Why ``param`` itself (type, layout, shape, dtype: fixed for its life) cannot take the masked path."""
    if type(param.detach()) is not torch.Tensor:
        return f"a {type(param.detach()).__qualname__} parameter (only plain dense tensors)"
    if param.layout != torch.strided or param.dim() not in (1, 2):
        return f"a {param.layout} parameter of shape {tuple(param.shape)} (only dense 1-D / 2-D)"
    if not param.is_floating_point():
        return f"a {param.dtype} parameter"
    return None


def _grad_and_state_unsupported(param: nn.Parameter, grad: torch.Tensor, state: dict) -> str | None:
    """Why this step's gradient or the parameter's optimizer state rules the masked path out, or None."""
    shape, device = param.shape, param.device
    if not (type(grad) is torch.Tensor and grad.layout == torch.strided and grad.shape == shape
            and grad.device == device):
        return "a sparse, subclassed or mismatched gradient"
    if state:
        step, m, v = state.get("step"), state.get("exp_avg"), state.get("exp_avg_sq")
        if not (len(state) == 3 and type(step) is torch.Tensor and step.numel() == 1 and type(m) is torch.Tensor
                and type(v) is torch.Tensor and m.shape == shape and v.shape == shape and m.device == device
                and v.device == device):
            return f"optimizer state with keys {sorted(state)} not in the stock Adam format"
    return None


def _init_adam_state(state: dict, param: nn.Parameter, group: dict) -> None:
    """``torch.optim.Adam._init_group``'s lazy state initialisation (amsgrad off)."""
    from torch.optim.optimizer import _get_scalar_dtype

    if group.get("capturable") or group.get("fused"):
        state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=param.device)
    else:
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


class OptimizerMask:
    """Keep omitted slices still through ``optimizer.step()``; ``remove()`` takes the hooks off.

    ``fast``: None = masked AdamW where exact, save / restore elsewhere; True = masked AdamW or an error;
    False = always save / restore (see the module docstring)."""

    def __init__(self, omitter, optimizer: torch.optim.Optimizer, *, fast: bool | None = None):
        if fast not in (None, True, False):
            raise ValueError(f"fast must be None, True or False, got {fast!r}")
        why = fast_path_unsupported(optimizer)
        if fast is True and why:
            raise ValueError(f"OptimizerMask(fast=True): {why}")
        self.omitter = omitter
        self.optimizer = optimizer
        self.fast = fast
        self.fast_updates = 0  # parameter updates done by the masked path, in all steps so far
        self._params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._saved: list = []
        self._held: list = []  # (param, group, keep_rows, keep_cols, grad) of this step's masked updates
        self._static: dict[int, str | None] = {}  # _param_unsupported per parameter (fixed for its life)
        self._pre = optimizer.register_step_pre_hook(self._before)
        self._post = optimizer.register_step_post_hook(self._after)
        omitter._masks.append(self)

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        self._saved, self._held = [], []
        slices = [s for s in self.omitter.omitted_units() if id(s[0]) in self._params]
        if slices and self.fast is not False:
            slices = self._hold_back(optimizer, kwargs, slices)
        for param, dim, ids, _ in slices:
            ids = _local_ids(param, dim, ids)  # into this rank's shard of an FSDP2 (DTensor) parameter
            state = optimizer.state.get(param, {})
            had_state = bool(state)
            saved_state = {key: _local(t).index_select(dim, ids) for key, t in state.items()
                           if _same_shape(t, param)}
            self._saved.append((param, dim, ids, _local(param.detach()).index_select(dim, ids), had_state,
                                saved_state))

    def _hold_back(self, optimizer, kwargs, slices: list) -> list:
        """Take the parameters the masked path can update out of the stock step; return the other slices."""
        why = _step_unsupported(optimizer, kwargs)
        if why:
            if self.fast:
                raise RuntimeError(f"OptimizerMask(fast=True): {why}")
            return slices
        by_param: dict[int, list] = {}
        for s in slices:
            by_param.setdefault(id(s[0]), []).append(s)
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        rest, held = [], []
        state = optimizer.state
        for entries in by_param.values():
            param = entries[0][0]
            grad = param.grad
            if grad is None:  # the stock step skips it as well
                continue
            why = self._static.get(id(param), ...)
            if why is ...:
                why = self._static[id(param)] = _param_unsupported(param)
            why = why or _grad_and_state_unsupported(param, grad, state.get(param, {}))
            if why:
                if self.fast:
                    raise RuntimeError(f"OptimizerMask(fast=True): {why}")
                rest.extend(entries)
                continue
            held.append((param, [e for e in entries if e[1] == 0], [e for e in entries if e[1] == 1]))
        # keep vectors: the plan's own (precomputed for all layers at once) where one (param, dim) has one
        # entry that carries it, else built here (intersections of several plans)
        requests = [([ids for _, _, ids, _ in es], param.shape[dim] if es else 0) for param, rows, cols in held
                    for dim, es in ((0, rows), (1, cols))]
        ready = [es[0][3] if len(es) == 1 else None for _, rows, cols in held for es in (rows, cols)]
        built = _keep_vectors([r if k is None else ([], 0) for r, k in zip(requests, ready, strict=True)])
        keeps = iter(k if k is not None else b for k, b in zip(ready, built, strict=True))
        for param, _, _ in held:
            keep_rows, keep_cols = next(keeps), next(keeps)
            self._held.append((param, group_of[id(param)], keep_rows, keep_cols, param.grad))
            param.grad = None
        return rest

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        try:
            for param, dim, ids, values, had_state, saved_state in self._saved:
                _local(param.detach()).index_copy_(dim, ids, values)
                state = optimizer.state.get(param, {})
                for key, t in state.items():
                    if not _same_shape(t, param):
                        continue
                    if key in saved_state:
                        _local(t).index_copy_(dim, ids, saved_state[key])
                    elif not had_state:
                        _local(t).index_fill_(dim, ids, 0)
            if self._held:
                self._masked_step(optimizer)
        finally:
            for param, _, _, _, grad in self._held:
                param.grad = grad
            self._saved, self._held = [], []
            self.omitter._optimizer_stepped()

    def _masked_step(self, optimizer) -> None:
        """Create missing state, count the step, update the kept slices of every held-back parameter."""
        steps: dict[torch.device, list[torch.Tensor]] = {}
        by_group: dict[int, tuple[dict, list]] = {}
        for param, group, keep_rows, keep_cols, grad in self._held:
            state = optimizer.state[param]
            if not state:
                _init_adam_state(state, param, group)
            step = state["step"]
            steps.setdefault(step.device, []).append(step)
            by_group.setdefault(id(group), (group, []))[1].append(
                (param, grad, state["exp_avg"], state["exp_avg_sq"], keep_rows, keep_cols, step))
        for device_steps in steps.values():
            torch._foreach_add_(device_steps, 1)
        for group, entries in by_group.values():
            params, grads, exp_avgs, exp_avg_sqs, keep_rows, keep_cols, group_steps = (
                list(column) for column in zip(*entries, strict=True))
            beta1, beta2 = group["betas"]
            masked_adamw_multi_(  # shapes and devices checked in _hold_back; in place under no_grad
                params, grads, exp_avgs, exp_avg_sqs, keep_rows=keep_rows, keep_cols=keep_cols, steps=group_steps,
                lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2), eps=_scalar(group["eps"]),
                weight_decay=_scalar(group["weight_decay"]),
                decoupled=bool(group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)),
                validate=False)
        self.fast_updates += len(self._held)

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()
        if self in self.omitter._masks:
            self.omitter._masks.remove(self)


def _keep_vectors(requests: list[tuple[list[torch.Tensor], int]]) -> list[torch.Tensor | None]:
    """For each (ids_list, n): None for an empty list, else a bool [n] vector, False at every id of every tensor
    in ``ids_list``. One vector per distinct request (gate / up / down share the channel ids, q / o the query
    rows, k / v the KV rows), built in a few batched kernels: the single-tensor requests of one device, length
    and id count together (one ``ones``, one ``stack``, one ``scatter_``)."""
    out: list[torch.Tensor | None] = [None] * len(requests)
    distinct: dict[tuple, list[int]] = {}
    for i, (ids_list, n) in enumerate(requests):
        if ids_list:
            distinct.setdefault((tuple(id(ids) for ids in ids_list), n), []).append(i)
    batches: dict[tuple, list[tuple]] = {}
    for where in distinct.values():
        ids_list, n = requests[where[0]]
        if len(ids_list) == 1:
            batches.setdefault((ids_list[0].device, n, ids_list[0].numel()), []).append((ids_list[0], where))
            continue
        keep = torch.ones(n, dtype=torch.bool, device=ids_list[0].device)
        for ids in ids_list:
            keep.index_fill_(0, ids, False)
        for i in where:
            out[i] = keep
    for (device, n, _), members in batches.items():
        keep = torch.ones(len(members), n, dtype=torch.bool, device=device)
        keep.scatter_(1, torch.stack([ids for ids, _ in members]), False)
        for row, (_, where) in enumerate(members):
            for i in where:
                out[i] = keep[row]
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (a view: writes reach the parameter); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_ids(param: torch.Tensor, dim: int, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` (indices along ``dim`` of the full parameter) as indices into this rank's local tensor.

    A plain tensor: ``ids`` themselves. An FSDP2 ``DTensor`` (``Shard(0)`` on a 1-D mesh, the layout
    ``fully_shard`` gives): along dim 0 the ids that fall in this rank's row block, shifted to start at 0
    (a host sync: the count depends on the data); along any other dim the ids as they are, since every rank
    holds all columns of its rows. Other layouts raise ``NotImplementedError``."""
    if not hasattr(param, "placements"):
        return ids
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(f"omitted slices of a DTensor placed as {placements} (only FSDP2's Shard(0))")
    if dim != 0:
        return ids
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    start, rows = int(offset[0]), int(shape[0])
    mine = (ids >= start) & (ids < start + rows)
    return ids[mine] - start


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _same_shape(t, param: nn.Parameter) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == param.shape

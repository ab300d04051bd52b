"""AdamW on the kept rows / columns of one parameter: omitted elements of the parameter and its moments stay
bit-for-bit untouched.

The update is ``torch.optim.AdamW``'s (``Adam``'s with ``decoupled=False``), per kept element, with ``step``
the count *including* this step (the optimizer's ``state["step"]`` after its increment)::

    p = p * (1 - lr * wd)                       # decoupled weight decay (decoupled=False: g = g + wd * p)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

Math in float32 (float64 for float64 tensors in the reference), results stored in each tensor's own dtype.

Shapes: ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` are all [R] or all [R, C] (any strides);
``keep_rows`` [R] and ``keep_cols`` [C] (2-D only) are bool / uint8 vectors on the parameter's device, nonzero
= kept; an element is updated iff its row and its column are kept (a missing vector keeps everything).

Two implementations:

* ``masked_adamw_reference_``: plain torch ops (any device, any float dtype): the dense update, then
  ``torch.where`` with the old values.
* ``masked_adamw_triton_``: one Triton kernel per parameter, grid (row blocks × column blocks); loads and
  stores are masked by the keep vectors, so omitted rows cost no memory traffic (omitted columns save whole
  sectors only where they come in runs). ``step`` may be a tensor on the parameter's device (fused /
  capturable AdamW keep it there): the bias corrections are then computed in the kernel, no host sync.
  CUDA, fp16 / bf16 / fp32; CPU tensors only under ``TRITON_INTERPRET=1`` (tests). The kernel is decorated
  lazily on first use (so that a test can set ``TRITON_INTERPRET`` first; importing this module never imports
  Triton).

``masked_adamw_`` chooses: Triton for CUDA tensors of a supported dtype when Triton imports, else the
reference (``impl=`` forces one).

Over many parameters (an optimizer's param group) ``masked_adamw_multi_`` / ``masked_adamw_multi_triton_`` do
the same with one launch per group of equal shape and dtypes: the tensors' addresses travel in a small int64
table, so the host cost is a few microseconds of Python per parameter instead of one kernel launch each
(``centrifuge.neurons.OptimizerMask`` uses this). Measured on an H100 (TinyLlama-1.1B shape, bf16, rate 0.5,
154 omitted tensors): the masked kernels take 5.8 ms of GPU time per step with the stock fused AdamW on the
other parameters, against 6.9 ms for the fused AdamW on everything.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from centrifuge.ops.triton_support import (
    TRITON_DTYPES,
    interpreting,
    jit_copies,
    next_pow2,
    on_triton_device,
    triton_available,
)

IMPLS = ("auto", "reference", "triton")


def _scalar(x) -> float:
    """A float from a Python number or a one-element tensor (one host read for a CUDA tensor)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _check(param, grad, exp_avg, exp_avg_sq, keep_rows, keep_cols) -> None:
    if param.dim() not in (1, 2):
        raise ValueError(f"masked AdamW takes 1-D or 2-D parameters, got shape {tuple(param.shape)}")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(f"{name} {tuple(t.shape)} on {t.device} does not match the parameter "
                             f"{tuple(param.shape)} on {param.device}")
    if keep_cols is not None and param.dim() != 2:
        raise ValueError("keep_cols needs a 2-D parameter")
    for name, keep, n in (("keep_rows", keep_rows, param.shape[0]),
                          ("keep_cols", keep_cols, param.shape[-1])):
        if keep is None:
            continue
        if keep.shape != (n,) or keep.dtype not in (torch.bool, torch.uint8) or keep.device != param.device:
            raise ValueError(f"{name} must be a bool / uint8 [{n}] vector on {param.device}, got "
                             f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def masked_adamw_reference_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    keep_rows: torch.Tensor | None = None, keep_cols: torch.Tensor | None = None,
    step: float | torch.Tensor, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float = 0.0, decoupled: bool = True,
) -> None:
    """Masked AdamW in plain torch ops, in place on ``param`` [R] / [R, C], ``exp_avg``, ``exp_avg_sq`` (same
    shape as ``grad``); ``keep_rows`` [R], ``keep_cols`` [C]. Math in float32 (float64 for float64 tensors)."""
    _check(param, grad, exp_avg, exp_avg_sq, keep_rows, keep_cols)
    step, lr, beta1, beta2 = _scalar(step), _scalar(lr), _scalar(beta1), _scalar(beta2)
    eps, weight_decay = _scalar(eps), _scalar(weight_decay)
    acc = torch.promote_types(param.dtype, torch.float32)
    p, g, m, v = (t.to(acc) for t in (param, grad, exp_avg, exp_avg_sq))
    if weight_decay != 0.0:
        if decoupled:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = torch.lerp(m, g, 1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p = p - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    keep = torch.ones((), dtype=torch.bool, device=param.device)
    if keep_rows is not None:
        keep = keep & (keep_rows.bool()[:, None] if param.dim() == 2 else keep_rows.bool())
    if keep_cols is not None:
        keep = keep & keep_cols.bool()[None, :]
    for out, new in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        out.copy_(torch.where(keep, new.to(out.dtype), out))


# --------------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------------

tl: Any = None  # triton.language, bound in the kernels' own namespace by ``_kernels``


def _tile(P, G, M, V, off_p, off_g, off_m, off_v, mask, step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps, wd,
          decay, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr):
    # one tile of the update: masked loads (no traffic for omitted elements), float32 math, masked stores
    p = tl.load(P + off_p, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + off_g, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + off_m, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + off_v, mask=mask, other=0.0).to(tl.float32)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + wd * p
    m = m + omb1 * (g - m)  # lerp(m, g, 1 - beta1); 1 - beta from the host (no float32 cancellation)
    v = beta2 * v + omb2 * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + off_p, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + off_m, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + off_v, v.to(V.dtype.element_ty), mask=mask)


def _bias_corrections(STEP, lr, log2_beta1, log2_beta2):
    # from the on-device step count (fused / capturable AdamW), in float64 as torch's fused kernel does:
    # 1 - beta2**t in float32 loses ~1e-4 of itself to cancellation at small t
    t = tl.load(STEP).to(tl.float64)
    step_size = (lr / (1.0 - tl.exp2(t * log2_beta1))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2)).to(tl.float32)
    return step_size, bc2_sqrt


def _masked_adamw_kernel(P, G, M, V, KEEP_R, KEEP_C, STEP, R, C, sp_r, sp_c, sg_r, sg_c, sm_r, sm_c, sv_r, sv_c,
                         lr, beta1, beta2, omb1, omb2, eps, wd, decay, log2_beta1, log2_beta2, step_size, bc2_sqrt,
                         HAS_KEEP_R: tl.constexpr, HAS_KEEP_C: tl.constexpr, STEP_PTR: tl.constexpr,
                         HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # one parameter; grid (row blocks, column blocks)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rin = rows < R
    cin = cols < C
    if HAS_KEEP_R:
        rin = rin & (tl.load(KEEP_R + rows, mask=rin, other=0) != 0)
    if HAS_KEEP_C:
        cin = cin & (tl.load(KEEP_C + cols, mask=cin, other=0) != 0)
    mask = rin[:, None] & cin[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    if STEP_PTR:
        step_size, bc2_sqrt = _bias_corrections(STEP, lr, log2_beta1, log2_beta2)
    _tile(P, G, M, V, r * sp_r + c * sp_c, r * sg_r + c * sg_c, r * sm_r + c * sm_c, r * sv_r + c * sv_c, mask,
          step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps, wd, decay, HAS_WD, DECOUPLED)


# Row of the multi-tensor table (int64): the addresses of param, grad, exp_avg, exp_avg_sq, keep_rows and
# keep_cols (a shared all-ones vector where none) and step (0 = host step: float table); for a strided group
# then the 8 strides (param, grad, exp_avg, exp_avg_sq; rows, columns).
_ADDRESSES = 7


def _masked_adamw_multi_kernel(TABLE, HOST, P0, G0, M0, V0, S0, R, C, NBC, lr, beta1, beta2, omb1, omb2, eps, wd,
                               decay, log2_beta1, log2_beta2, CONTIG: tl.constexpr, STEP_PTR: tl.constexpr,
                               HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    # parameters of one shape and dtypes; grid (blocks of one parameter, parameters). P0 ... S0: one tensor of
    # each role, for the element types the table's addresses are cast to. CONTIG: all four tensors contiguous
    # and 16-byte aligned (offsets r * C + c, vectorised loads).
    blk = tl.program_id(0)
    i = tl.program_id(1)
    row = TABLE + i.to(tl.int64) * (7 if CONTIG else 15)
    P = tl.load(row).to(tl.pointer_type(P0.dtype.element_ty))
    G = tl.load(row + 1).to(tl.pointer_type(G0.dtype.element_ty))
    M = tl.load(row + 2).to(tl.pointer_type(M0.dtype.element_ty))
    V = tl.load(row + 3).to(tl.pointer_type(V0.dtype.element_ty))
    rows = (blk // NBC) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (blk % NBC) * BLOCK_C + tl.arange(0, BLOCK_C)
    rin = rows < R
    cin = cols < C
    rin = rin & (tl.load(tl.load(row + 4).to(tl.pointer_type(tl.uint8)) + rows, mask=rin, other=0) != 0)
    cin = cin & (tl.load(tl.load(row + 5).to(tl.pointer_type(tl.uint8)) + cols, mask=cin, other=0) != 0)
    mask = rin[:, None] & cin[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    if STEP_PTR:
        step_size, bc2_sqrt = _bias_corrections(tl.load(row + 6).to(tl.pointer_type(S0.dtype.element_ty)), lr,
                                                log2_beta1, log2_beta2)
    else:
        step_size = tl.load(HOST + i * 2)
        bc2_sqrt = tl.load(HOST + i * 2 + 1)
    if CONTIG:
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        off = r * C + c
        _tile(P, G, M, V, off, off, off, off, mask, step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps, wd,
              decay, HAS_WD, DECOUPLED)
    else:
        off_p = r * tl.load(row + 7) + c * tl.load(row + 8)
        off_g = r * tl.load(row + 9) + c * tl.load(row + 10)
        off_m = r * tl.load(row + 11) + c * tl.load(row + 12)
        off_v = r * tl.load(row + 13) + c * tl.load(row + 14)
        _tile(P, G, M, V, off_p, off_g, off_m, off_v, mask, step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps,
              wd, decay, HAS_WD, DECOUPLED)


_HELPERS = ("_tile", "_bias_corrections")
_KERNEL_NAMES = ("_masked_adamw_kernel", "_masked_adamw_multi_kernel")


@functools.cache
def _kernels(interpret: bool) -> dict[str, Any]:
    """The jitted kernels, once per interpreter mode (``interpret`` keys the cache; see ``triton_support``)."""
    k = jit_copies(globals(), (*_HELPERS, *_KERNEL_NAMES))
    return {"single": k["_masked_adamw_kernel"], "multi": k["_masked_adamw_multi_kernel"]}


def triton_supports(param: torch.Tensor, *tensors: torch.Tensor, allow_interpreter: bool = False) -> bool:
    """Whether ``masked_adamw_triton_`` can take these tensors: CUDA (or CPU under ``TRITON_INTERPRET=1`` with
    ``allow_interpreter``), fp16 / bf16 / fp32, 1-D / 2-D, Triton importable."""
    on_device = on_triton_device(param, allow_interpreter=allow_interpreter)
    return (on_device and param.dim() in (1, 2) and all(t.dtype in TRITON_DTYPES for t in (param, *tensors))
            and triton_available())


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0.0 else float("-inf")


@torch.no_grad()
def masked_adamw_triton_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    keep_rows: torch.Tensor | None = None, keep_cols: torch.Tensor | None = None,
    step: float | torch.Tensor, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float = 0.0, decoupled: bool = True, block: tuple[int, int] | None = None,
    num_warps: int = 4,
) -> None:
    """Masked AdamW as one Triton kernel, in place; shapes as ``masked_adamw_reference_``. ``step``: a number
    or a one-element tensor (on the parameter's device: read in the kernel; elsewhere: read on the host).
    ``block``: (BLOCK_R, BLOCK_C) powers of two (default: ≈ 2048 elements per program, ≤ 256 columns)."""
    _check(param, grad, exp_avg, exp_avg_sq, keep_rows, keep_cols)
    if not triton_supports(param, grad, exp_avg, exp_avg_sq, allow_interpreter=True):
        raise ValueError(f"masked_adamw_triton_ needs CUDA (or TRITON_INTERPRET=1), fp16/bf16/fp32 and Triton; "
                         f"got {param.dtype} on {param.device}")
    if param.numel() == 0:
        return
    lr, beta1, beta2 = _scalar(lr), _scalar(beta1), _scalar(beta2)
    eps, weight_decay = _scalar(eps), _scalar(weight_decay)
    step_ptr = isinstance(step, torch.Tensor) and step.device == param.device and step.numel() == 1
    if step_ptr:
        step_t, step_size, bc2_sqrt = step, 0.0, 1.0
    else:
        s = _scalar(step)
        step_t, step_size, bc2_sqrt = param, lr / (1.0 - beta1 ** s), math.sqrt(1.0 - beta2 ** s)
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if param.dim() == 2:
        R, C = param.shape
        strides = [s for t in tensors for s in t.stride()]
    else:
        R, C = param.shape[0], 1
        strides = [s for t in tensors for s in (t.stride(0), 0)]
    if block is None:
        bc = min(next_pow2(C), 256)
        br = max(1, min(next_pow2(R), 2048 // bc))
    else:
        br, bc = block
    kr = param if keep_rows is None else keep_rows.view(torch.uint8) if keep_rows.dtype == torch.bool else keep_rows
    kc = param if keep_cols is None else keep_cols.view(torch.uint8) if keep_cols.dtype == torch.bool else keep_cols
    grid = (-(-R // br), -(-C // bc))
    _kernels(interpreting())["single"][grid](
        param, grad, exp_avg, exp_avg_sq, kr, kc, step_t, R, C, *strides,
        lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, _log2(beta1),
        _log2(beta2), step_size, bc2_sqrt,
        HAS_KEEP_R=keep_rows is not None, HAS_KEEP_C=keep_cols is not None, STEP_PTR=step_ptr,
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), BLOCK_R=br, BLOCK_C=bc, num_warps=num_warps,
    )


_ONES: dict[torch.device, torch.Tensor] = {}


def _ones(device: torch.device, n: int) -> torch.Tensor:
    """A uint8 all-ones vector of at least ``n`` entries on ``device`` (kept per device, grown by doubling)."""
    t = _ONES.get(device)
    if t is None or t.numel() < n:
        t = _ONES[device] = torch.ones(next_pow2(n), dtype=torch.uint8, device=device)
    return t


@torch.no_grad()
def masked_adamw_multi_triton_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], *, keep_rows: list[torch.Tensor | None], keep_cols: list[torch.Tensor | None],
    steps: list[float | torch.Tensor], lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float = 0.0, decoupled: bool = True, block: tuple[int, int] | None = None, num_warps: int = 4,
    validate: bool = True,
) -> int:
    """``masked_adamw_triton_`` over lists (one entry per parameter, shapes as there) with one kernel launch per
    group of parameters of equal shape, dtypes, layout (contiguous and 16-byte aligned, or strided) and step
    placement (device tensors or host numbers): the addresses (and strides) travel in one int64 table, one
    host-to-device copy for all groups. 1-D parameters run as [1, R] rows with their keep vector on the columns.
    ``validate=False`` skips the per-parameter argument checks (callers that checked already: they cost a few
    microseconds per parameter). Returns the number of kernel launches."""
    n = len(params)
    for seq, name in ((grads, "grads"), (exp_avgs, "exp_avgs"), (exp_avg_sqs, "exp_avg_sqs"),
                      (keep_rows, "keep_rows"), (keep_cols, "keep_cols"), (steps, "steps")):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} parameters")
    if n == 0:
        return 0
    device = params[0].device
    lr, beta1, beta2 = _scalar(lr), _scalar(beta1), _scalar(beta2)
    eps, weight_decay = _scalar(eps), _scalar(weight_decay)
    groups: dict[tuple, list] = {}
    longest = 1
    for p, g, m, v, kr, kc, step in zip(params, grads, exp_avgs, exp_avg_sqs, keep_rows, keep_cols, steps,
                                        strict=True):
        if validate:
            _check(p, g, m, v, kr, kc)
            if p.device != device or not triton_supports(p, g, m, v, allow_interpreter=True):
                raise ValueError(f"masked_adamw_multi_triton_ needs tensors on one CUDA device (or CPU under "
                                 f"TRITON_INTERPRET=1), fp16/bf16/fp32 and Triton; got {p.dtype} on {p.device}")
        shape = p.shape
        if not p.numel():
            continue
        if len(shape) == 1:  # [R] as [1, R]: the row keep becomes a column keep
            shape, kr, kc = (1, shape[0]), None, kr
        ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
        contig = (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                  and not (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]) & 15)
        on_device = type(step) is torch.Tensor and step.device == device
        key = (tuple(shape), p.dtype, g.dtype, m.dtype, v.dtype, step.dtype if on_device else None, contig)
        groups.setdefault(key, []).append((p, g, m, v, kr, kc, step, ptrs))
        longest = max(longest, *shape)
    ones = _ones(device, longest).data_ptr()
    ints: list[int] = []
    host: list[float] = []
    launches = []
    for key, members in groups.items():
        on_device, contig = key[-2] is not None, key[-1]
        launches.append((key, members, len(ints), len(host)))
        for p, g, m, v, kr, kc, step, ptrs in members:
            ints.extend(ptrs)
            ints.append(ones if kr is None else kr.data_ptr())
            ints.append(ones if kc is None else kc.data_ptr())
            ints.append(step.data_ptr() if on_device else 0)
            if not contig:
                if p.dim() == 1:
                    ints.extend(s for t in (p, g, m, v) for s in (0, t.stride(0)))
                else:
                    ints.extend(s for t in (p, g, m, v) for s in t.stride())
            if on_device:
                host += (0.0, 0.0)
            else:
                t = _scalar(step)
                host += (lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t))
    if not launches:
        return 0
    # pinned (PyTorch's caching host allocator) so that the copies are asynchronous: from pageable memory the
    # copy would wait for the work queued before it (the stock optimizer step, say) and stall the host
    pin = device.type == "cuda"
    table = torch.tensor(ints, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
    host_t = torch.tensor(host, dtype=torch.float32, pin_memory=pin).to(device, non_blocking=True)
    kern = _kernels(interpreting())["multi"]
    for key, members, first, first_host in launches:
        (R, C), on_device, contig = key[0], key[-2] is not None, key[-1]
        if block is None:
            bc = min(next_pow2(C), 256)
            br = max(1, min(next_pow2(R), 2048 // bc))
        else:
            br, bc = block
        p, g, m, v, _, _, step, _ = members[0]
        nbc = -(-C // bc)
        kern[(-(-R // br) * nbc, len(members))](
            table[first:], host_t[first_host:], p, g, m, v, step if on_device else p, R, C, nbc, lr, beta1, beta2,
            1.0 - beta1, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, _log2(beta1), _log2(beta2),
            CONTIG=contig, STEP_PTR=on_device, HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), BLOCK_R=br,
            BLOCK_C=bc, num_warps=num_warps,
        )
    return len(launches)


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------


def masked_adamw_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    keep_rows: torch.Tensor | None = None, keep_cols: torch.Tensor | None = None,
    step: float | torch.Tensor, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float = 0.0, decoupled: bool = True, impl: str = "auto",
) -> str:
    """Masked AdamW in place on ``param`` [R] / [R, C] and its moments ``exp_avg`` / ``exp_avg_sq`` (same shape
    as ``grad``); only elements in a kept row (``keep_rows`` [R]) and a kept column (``keep_cols`` [C]) move.

    ``step``: the step count including this step. ``decoupled``: AdamW's weight decay (False: Adam's L2 term
    added to the gradient). ``impl``: "auto" (Triton on CUDA where supported, else the reference),
    "reference" or "triton". Returns the implementation that ran."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if triton_supports(param, grad, exp_avg, exp_avg_sq) else "reference"
    fn = masked_adamw_triton_ if impl == "triton" else masked_adamw_reference_
    fn(param, grad, exp_avg, exp_avg_sq, keep_rows=keep_rows, keep_cols=keep_cols, step=step, lr=lr,
       beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
    return impl


def masked_adamw_multi_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], *, keep_rows: list[torch.Tensor | None], keep_cols: list[torch.Tensor | None],
    steps: list[float | torch.Tensor], lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float = 0.0, decoupled: bool = True, impl: str = "auto", validate: bool = True,
) -> str:
    """``masked_adamw_`` over lists of parameters sharing the hyperparameters (one optimizer param group):
    ``params[i]`` [R_i] / [R_i, C_i] with ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]``, ``keep_rows[i]``
    [R_i] or None, ``keep_cols[i]`` [C_i] or None, ``steps[i]`` (count including this step). "auto": one
    Triton launch per shape group (``masked_adamw_multi_triton_``) when every tensor is a CUDA tensor of a
    supported dtype on one device and Triton imports, else the reference per parameter. ``validate=False``:
    the caller vouches for shapes and devices (see ``masked_adamw_multi_triton_``). Returns the implementation
    that ran."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    hp = dict(lr=_scalar(lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
    if impl == "auto":
        device = params[0].device if params else None
        impl = "triton" if (
            device is not None and device.type == "cuda" and triton_available()
            and all(t.device == device and t.dtype in TRITON_DTYPES
                    for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts)) else "reference"
    if impl == "triton":
        masked_adamw_multi_triton_(params, grads, exp_avgs, exp_avg_sqs, keep_rows=keep_rows, keep_cols=keep_cols,
                                   steps=steps, validate=validate, **hp)
    else:
        for p, g, m, v, kr, kc, step in zip(params, grads, exp_avgs, exp_avg_sqs, keep_rows, keep_cols, steps,
                                            strict=True):
            masked_adamw_reference_(p, g, m, v, keep_rows=kr, keep_cols=kc, step=step, **hp)
    return impl


__all__ = ["IMPLS", "masked_adamw_", "masked_adamw_multi_", "masked_adamw_multi_triton_", "masked_adamw_reference_",
           "masked_adamw_triton_", "triton_supports"]

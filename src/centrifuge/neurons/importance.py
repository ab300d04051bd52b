"""Importance of MLP channels and KV groups, and the selection of the kept set from it.

Metrics (higher = more important; d hidden, m intermediate, H / Hkv heads, G = H / Hkv, D head dim):

* ``uniform``: no score; a uniformly random subset.
* ``magnitude``: L2 norm of all the unit's weights (channel i: row i of gate and up, column i of down;
  group j: its q / k / v rows and o columns).
* ``wanda``: Σ_j |W_ij| · ‖x_j‖ over the rows of the matrices that read the layer input (gate and up for a
  channel; q, k and v for a group), with ‖x_j‖ the root-mean-square of input feature j over tokens
  (Wanda's |W|·‖X‖ summed over a unit's rows).
* ``activation``: root-mean-square over tokens of the unit's output — the gated activation a_i =
  act(g_i)·u_i of a channel, the attention output of a group's heads — gathered during earlier training
  forwards (EMA; a unit's score only changes on steps where it was kept), so no dense pre-pass is needed.

The activation and input statistics read at most ``stat_tokens`` tokens of a forward (an even stride
through the batch; ``OmissionConfig.stat_tokens``, default 4096).

The weight- and input-based scores are also computed inside the training forward, where the weights are
gathered (FSDP), and used by the next step's plan.

Selection (``select``): ``topk`` keeps the k highest scores; ``sample`` draws k units without replacement
with probability ∝ softmax(z / temperature), z = the scores standardised per layer (so one temperature fits
every metric), via the Gumbel-top-k trick; seeded by the caller's generator, so deterministic.
"""

from __future__ import annotations

import torch

METRICS = ("uniform", "magnitude", "wanda", "activation")
SELECTIONS = ("topk", "sample")


def _norm(w: torch.Tensor, dim) -> torch.Tensor:
    """L2 norm over ``dim``, accumulated in at least float32, returned as float32."""
    return torch.linalg.vector_norm(w, dim=dim, dtype=torch.promote_types(w.dtype, torch.float32)).float()


def _sq_norm(w: torch.Tensor, dim) -> torch.Tensor:
    return _norm(w, dim).square()


def _abs_mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|w| [r, n] @ x [n] → [r] float32 (in w's dtype: no float32 copy of the weight)."""
    return torch.mv(w.abs(), x.to(w.dtype)).float()


# ------------------------------------------------------------------------------------------- MLP channels


def mlp_magnitude(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """gate_w, up_w [m, d], down_w [d, m] → [m] float32: sqrt(‖gate_i‖² + ‖up_i‖² + ‖down_:,i‖²)."""
    return (_sq_norm(gate_w, 1) + _sq_norm(up_w, 1) + _sq_norm(down_w, 0)).sqrt()


def mlp_wanda(gate_w: torch.Tensor, up_w: torch.Tensor, x_rms: torch.Tensor) -> torch.Tensor:
    """gate_w, up_w [m, d], x_rms [d] → [m] float32: Σ_j (|gate_ij| + |up_ij|)·x_rms_j."""
    return _abs_mv(gate_w, x_rms) + _abs_mv(up_w, x_rms)


# ------------------------------------------------------------------------------------------- KV groups


def group_magnitude(q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, o_w: torch.Tensor, *,
                    heads_per_group: int, head_dim: int) -> torch.Tensor:
    """q_w [H·D, d], k_w / v_w [Hkv·D, d], o_w [d, H·D] → [Hkv] float32: L2 norm of each group's weights."""
    hkv = k_w.shape[0] // head_dim
    q = _sq_norm(q_w, 1).view(hkv, heads_per_group * head_dim).sum(1)
    kv = (_sq_norm(k_w, 1) + _sq_norm(v_w, 1)).view(hkv, head_dim).sum(1)
    o = _sq_norm(o_w, 0).view(hkv, heads_per_group * head_dim).sum(1)
    return (q + kv + o).sqrt()


def group_wanda(q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, x_rms: torch.Tensor, *,
                heads_per_group: int, head_dim: int) -> torch.Tensor:
    """q_w [H·D, d], k_w / v_w [Hkv·D, d], x_rms [d] → [Hkv] float32: Σ over the group's rows of |W|·x_rms."""
    hkv = k_w.shape[0] // head_dim
    q = _abs_mv(q_w, x_rms).view(hkv, heads_per_group * head_dim).sum(1)
    kv = (_abs_mv(k_w, x_rms) + _abs_mv(v_w, x_rms)).view(hkv, head_dim).sum(1)
    return q + kv


# ------------------------------------------------------------------------------------------- activations


def token_sample(rows: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    """rows [R, n] → an evenly strided view of at most ``max_rows`` of them (all when None / 0 / R ≤ max).

    The statistics are estimates anyway (an EMA over steps); reading a quarter of the tokens of an 8×2048
    batch instead of all of them takes ~1.5 ms off a TinyLlama step on an H100 (they are memory-bound reads
    of the layer's largest activations)."""
    total = rows.shape[0]
    if not max_rows or total <= max_rows:
        return rows
    return rows[:: -(-total // max_rows)]


def feature_norms(x: torch.Tensor, max_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """x [..., n] → ([n] float32 L2 norm of each feature over the tokens read, how many tokens were read):
    all leading (token) positions, or an evenly strided sample of at most ``max_rows`` (``token_sample``).
    One reduction kernel."""
    rows = token_sample(x.reshape(-1, x.shape[-1]), max_rows)
    return _norm(rows, 0), rows.shape[0]


def rms_from_norms(norms: torch.Tensor, count: int) -> torch.Tensor:
    """L2 norms over ``count`` values → root-mean-squares."""
    return norms / max(count, 1) ** 0.5


def feature_rms(x: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
    """x [..., n] → [n] float32: root-mean-square of each feature over the leading (token) dimensions — over
    an evenly strided sample of at most ``max_rows`` tokens when given (``token_sample``)."""
    return rms_from_norms(*feature_norms(x, max_rows))


def head_feature_norms(o: torch.Tensor, max_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Attention output o [B, S, h, D] → ([h·D] float32 L2 norm of each head feature over the tokens read, how
    many tokens were read). One reduction kernel: the input to ``groups_from_feature_norms``."""
    h, D = o.shape[2], o.shape[3]
    tokens = o.shape[0] * o.shape[1]
    if o.is_contiguous() or (max_rows and tokens > max_rows):
        # a column reduction of [B·S, h·D]: ~3× faster on an H100 than reducing dims (0, 1) of [B, S, h, D]
        return feature_norms(o.reshape(tokens, h * D), max_rows)
    return _norm(o, (0, 1)).reshape(h * D), tokens


def groups_from_feature_norms(norms: torch.Tensor, tokens: int, *, head_dim: int,
                              heads_per_group: int) -> torch.Tensor:
    """Head-feature norms [..., h·D] over ``tokens`` tokens → [..., g] float32: per KV group, the sum over its
    heads of the head output's root-mean-square over tokens and D (batched over leading dimensions)."""
    lead = norms.shape[:-1]
    heads = rms_from_norms(norms.square().view(*lead, -1, head_dim).sum(-1).sqrt(), tokens * head_dim)
    return heads.view(*lead, -1, heads_per_group).sum(-1)


def group_activation(o: torch.Tensor, heads_per_group: int, max_rows: int | None = None) -> torch.Tensor:
    """Attention output o [B, S, h, D] (h = g·G kept query heads) → [g] float32: per group, the sum over its
    heads of the head output's root-mean-square over tokens and D (tokens: at most ``max_rows`` of them,
    evenly strided, when given)."""
    norms, tokens = head_feature_norms(o, max_rows)
    return groups_from_feature_norms(norms, tokens, head_dim=o.shape[3], heads_per_group=heads_per_group)


# ------------------------------------------------------------------------------------------- selection


def select(scores: torch.Tensor | None, k: int, *, method: str = "topk", temperature: float = 1.0,
           generator: torch.Generator | None = None, shape: tuple[int, int] | None = None,
           device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose k of n units in each of L rows.

    Args:
        scores: [L, n] importance (higher = keep), or None for a uniformly random choice (then ``shape``
            and ``device`` give [L, n]).
        k: units to keep per row, 1 ≤ k ≤ n.
        method: "topk" or "sample" (without replacement, p ∝ softmax(standardised score / temperature)).
        generator: the source of randomness for "sample" and for ``scores=None``; on the scores' device.

    Returns:
        kept [L, k] and dropped [L, n − k], int64, each row sorted. No host synchronisation.
    """
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; choose one of {', '.join(SELECTIONS)}")
    if scores is None:
        if shape is None:
            raise ValueError("select(scores=None) needs shape=(L, n)")
        keys = torch.rand(shape, generator=generator, device=device)
    else:
        keys = scores.float()
        if method == "sample":
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            mean = keys.mean(1, keepdim=True)
            std = keys.std(1, keepdim=True, correction=0)
            z = (keys - mean) / std.clamp_min(1e-12)
            u = torch.rand(keys.shape, generator=generator, device=keys.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
            keys = z / temperature + gumbel
    n = keys.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} units")
    order = keys.argsort(dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values

"""What ``centrifuge bench`` times: a registry of variants, and modifiers that combine with any of them.

A *variant* is one way to run a training step on the group's model and batch. It is a small subclass of
``Variant`` registered with ``@register``; the harness calls, per repetition,

    loss = variant.forward(run)          # timed as "fwd"
    [loss = variant.backward_graph(run)] # only if separate_backward_graph: untimed (the ideal's κ·B graph)
    variant.backward(run, loss)          # timed as "bwd"
    optimizer.step()                     # timed as "opt" (AdamW, fused/foreach)

around ``variant.prepare(run)`` / ``variant.cleanup(run)`` (patch and un-patch the shared model). A
variant whose model has another shape (``narrow``) returns HF config changes from ``config_overrides``
and gets its own model. ``uses_keep`` variants run once per ``--keep`` value.

A *modifier* (``+ckpt``, ``+narrow``, ``+narrow_heads``) is appended to a variant's name:
``ideal+ckpt`` is the ideal with activation checkpointing, ``ideal+narrow_heads`` the token-filtering
ceiling on the half-MLP, half-heads model.

Adding a variant is a few lines::

    @register
    class MyVariant(Variant):
        name = "mine"
        help = "what it measures"
        uses_keep = True
        def prepare(self, run): centrifuge.apply(run.model, mode="fast")
        def forward(self, run):
            return run.model(input_ids=run.input_ids, labels=run.labels, keep_mask=run.keep).loss
        def cleanup(self, run): centrifuge.revert(run.model)
        work = token_sparse_work   # model FLOPs for MFU (default: dense)

Conventions: ``run.keep`` [B, T] bool is over *prediction positions* (position t predicts token t + 1,
Hugging Face's label shift), with exactly ``kept_per_row(T, κ)`` kept per row and the last position (no
target) never kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from centrifuge.bench.flops import Work, attention_dims, dense_work

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------
# What a variant sees
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One variant's model and batch for a measurement (shared by all its repetitions).

    Attributes:
        model: the HF causal LM (train mode, ``use_cache`` off); shared with other variants of its shape.
        input_ids: [B, T] int64 random token ids in [1, vocab) (never 0), seeded.
        labels: [B, T] int64, equal to ``input_ids`` (HF shifts them inside its loss).
        keep: [B, T] bool keep mask over prediction positions, or None for variants without a keep ratio.
        keep_ratio: κ, or None.
        omit: ρ, the neuron omission rate of ``narrow`` shapes.
        seed: seed of the data and the masks.
        notes: lines a variant adds to the report (how it was composed).
        state: scratch space for the variant between prepare and cleanup.
    """

    model: nn.Module
    input_ids: torch.Tensor
    labels: torch.Tensor
    keep: torch.Tensor | None
    keep_ratio: float | None
    omit: float
    seed: int
    notes: list[str] = dataclasses.field(default_factory=list)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq(self) -> int:
        return int(self.input_ids.shape[1])


# --------------------------------------------------------------------------------------------------------
# Token masks and losses
# --------------------------------------------------------------------------------------------------------


def kept_per_row(seq: int, keep_ratio: float) -> int:
    """Prediction positions kept per row: round(κ·T), at least 1, at most T − 1 (the last has no target)."""
    return int(min(seq - 1, max(1, round(keep_ratio * seq))))


def random_keep_mask(batch: int, seq: int, keep_ratio: float, *, seed: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, T] bool: ``kept_per_row(T, κ)`` random prediction positions per row, the last never kept."""
    k = kept_per_row(seq, keep_ratio)
    gen = torch.Generator().manual_seed(seed + 7919)
    scores = torch.rand(batch, seq, generator=gen)
    scores[:, -1] = -1.0
    idx = scores.topk(k, dim=1).indices
    keep = torch.zeros(batch, seq, dtype=torch.bool).scatter_(1, idx, True)
    return keep.to(device)


def labels_for_keep(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """HF-style labels [B, T] whose loss counts only the kept prediction positions of ``keep`` [B, T].

    Position t predicts ``labels[t + 1]``, so label t + 1 is ignored (-100) where ``keep[t]`` is False."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, 1:] = torch.where(keep[:, :-1], labels[:, 1:], IGNORE_INDEX)
    return out


def topk_selector(keep_ratio: float) -> Callable[..., torch.Tensor]:
    """A ``select`` callable for ``model(..., select=fn)``: per row, the ``kept_per_row`` highest scores.

    ``fn(scores=[B, T] float, valid=[B, T] bool | None) -> keep [B, T] bool`` (Rho-1 style top-k on the
    current per-token loss; invalid positions never kept)."""

    def select(*args: torch.Tensor, scores: torch.Tensor | None = None, valid: torch.Tensor | None = None,
               **_: Any) -> torch.Tensor:
        s = (scores if scores is not None else args[0]).detach().float()
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        k = kept_per_row(s.shape[1], keep_ratio)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1).indices, True)
        return keep & valid if valid is not None else keep

    return select


def hf_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar loss of the model's own forward (HF ``ForCausalLMLoss``: mean CE over non-ignored labels)."""
    return model(input_ids=input_ids, labels=labels, use_cache=False).loss


# --------------------------------------------------------------------------------------------------------
# Model FLOPs per variant (for MFU)
# --------------------------------------------------------------------------------------------------------


def full_work(variant: Variant, run: Run) -> Work:
    """Dense step of the run's model over the whole [B, T] batch."""
    return dense_work(run.model, run.batch, run.seq)


def token_sparse_work(variant: Variant, run: Run) -> Work:
    """Forward on all tokens, backward on the kept fraction κ (linear layers exactly κ; attention approx.)."""
    dense = dense_work(run.model, run.batch, run.seq)
    kappa = 1.0 if run.keep_ratio is None else run.keep_ratio
    return Work(fwd=dense.fwd, bwd=kappa * dense.bwd)


# --------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------


class Variant:
    """Base class: the dense HF step. Subclasses override only what differs (see the module docstring)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    uses_keep: ClassVar[bool] = False
    separate_backward_graph: ClassVar[bool] = False
    needs_cuda: ClassVar[bool] = False  # skipped (status "unavailable") on other devices
    composition: ClassVar[str] = "fwd, bwd and opt timed back to back in one training step"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this variant cannot run here (a missing package, API), or None."""
        return None

    def config_overrides(self, config: Any, *, omit: float) -> dict[str, Any]:
        """HF config changes; non-empty means a model of another shape (built and cached separately)."""
        return {}

    def prepare(self, run: Run) -> None:
        """Patch the model / build inputs before the repetitions (untimed)."""

    def forward(self, run: Run) -> torch.Tensor:
        """The timed forward; returns the scalar loss."""
        return hf_loss(run.model, run.input_ids, run.labels)

    def backward_graph(self, run: Run) -> torch.Tensor:
        """Untimed: build the graph whose backward is timed (only if ``separate_backward_graph``)."""
        raise NotImplementedError

    def backward(self, run: Run, loss: torch.Tensor) -> None:
        """The timed backward."""
        loss.backward()

    def setup_optimizer(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the variant's optimizer, after ``prepare`` (e.g. neuron omission's protect)."""

    def cleanup(self, run: Run) -> None:
        """Undo ``prepare`` (the model is reused by the next variant)."""

    work: Callable[[Variant, Run], Work] = full_work


VARIANTS: dict[str, type[Variant]] = {}


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: add a variant to the registry under ``cls.name``."""
    if not cls.name or "+" in cls.name or "," in cls.name:
        raise ValueError(f"bad variant name {cls.name!r}")
    VARIANTS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------------------
# Built-in variants
# --------------------------------------------------------------------------------------------------------


@register
class Dense(Variant):
    name = "dense"
    help = "the Hugging Face model as is: ordinary loss over every token, full backward (the baseline)"


@register
class DenseCompiled(Variant):
    name = "dense_compiled"
    help = ("the dense baseline with every decoder layer under torch.compile (nn.Module.compile per layer; "
            "the causal mask is built eagerly, so SDPA keeps is_causal and its flash / cuDNN kernels)")

    def prepare(self, run: Run) -> None:
        for layer in run.model.model.layers:
            layer.compile()

    def cleanup(self, run: Run) -> None:
        for layer in run.model.model.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager __call__


@register
class DenseCompiledModel(Variant):
    name = "dense_compiled_model"
    help = ("the dense baseline under model.compile() (whole model). With torch < 2.14, transformers builds a "
            "materialized [T, T] causal mask while compiling, so SDPA leaves its flash kernels: slow at long T")

    def prepare(self, run: Run) -> None:
        run.model.compile()

    def cleanup(self, run: Run) -> None:
        run.model._compiled_call_impl = None


@register
class DenseLiger(Variant):
    name = "dense_liger"
    help = ("the dense baseline with Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy "
            "(its instance patch, as Trainer(use_liger_kernel=True) applies; undone after)")
    needs_cuda = True

    @classmethod
    def unavailable(cls) -> str | None:
        from centrifuge.models.liger import liger_available

        return liger_available()

    def prepare(self, run: Run) -> None:
        from centrifuge.models.liger import LigerDense

        run.state["liger"] = LigerDense(run.model)

    def cleanup(self, run: Run) -> None:
        liger = run.state.pop("liger", None)
        if liger is not None:
            liger.revert()


DENSE_BASELINES = ("dense", "dense_compiled", "dense_liger", "dense_compiled_model")


@register
class LossOnly(Variant):
    name = "loss_only"
    help = "same forward, loss = mean CE over a random κ-fraction of tokens, full backward (Rho-1 masking)"
    uses_keep = True

    def prepare(self, run: Run) -> None:
        run.state["labels"] = labels_for_keep(run.labels, run.keep)

    def forward(self, run: Run) -> torch.Tensor:
        return hf_loss(run.model, run.input_ids, run.state["labels"])


def compact_shape(batch: int, seq: int, keep_ratio: float) -> tuple[int, int, str]:
    """(B', T', how) of the ideal's backward batch: κ·B sequences if integral, else B sequences of κ·T."""
    kb = keep_ratio * batch
    if abs(kb - round(kb)) < 1e-9 and round(kb) >= 1:
        return int(round(kb)), seq, "κ·B sequences"
    kt = max(1, round(keep_ratio * seq))
    return batch, kt, f"κ·B = {kb:g} is not an integer: B sequences of κ·T = {kt} tokens"


@register
class Ideal(Variant):
    name = "ideal"
    help = "ceiling of a token-sparse backward: forward on B sequences, backward on κ·B"
    uses_keep = True
    separate_backward_graph = True
    composition = ("fwd = forward on the full B×T batch (its graph is then dropped); an untimed "
                   "forward builds the graph of a κ·B×T batch (B×κ·T when κ·B is not an integer: attention "
                   "work then falls as κ², an optimistic ceiling); bwd = "
                   "that graph's backward; step = fwd + bwd + opt. Peak/activation memory are of the "
                   "compact part (fwd(κ·B) + bwd + opt); peak_full also includes the full forward")

    def prepare(self, run: Run) -> None:
        b, t, how = compact_shape(run.batch, run.seq, run.keep_ratio)
        run.state["ids"] = run.input_ids[:b, :t].contiguous()
        run.state["shape"] = (b, t)
        run.notes.append(f"ideal κ={run.keep_ratio:g}: backward on {b}×{t} ({how})")

    def backward_graph(self, run: Run) -> torch.Tensor:
        ids = run.state["ids"]
        return hf_loss(run.model, ids, ids)

    def work(self, run: Run) -> Work:
        b, t = run.state["shape"]
        return Work(fwd=dense_work(run.model, run.batch, run.seq).fwd, bwd=dense_work(run.model, b, t).bwd)


def _round_channels(x: float) -> int:
    """Tensor-core friendly size: a multiple of 64 from 1024 up, else of 8 (at least 8)."""
    step = 64 if x >= 1024 else 8
    return int(max(8, round(x / step) * step))


def narrow_overrides(config: Any, omit: float, *, heads: bool) -> dict[str, Any]:
    """Config changes of the omission ceilings: MLP intermediate × (1 − ρ); with ``heads`` also query and
    KV heads × (1 − ρ) (head_dim kept; query heads a multiple of the KV heads)."""
    if not 0.0 <= omit < 1.0:
        raise ValueError(f"omission rate must be in [0, 1), got {omit}")
    keep = 1.0 - omit
    out: dict[str, Any] = {"intermediate_size": _round_channels(config.intermediate_size * keep)}
    if heads:
        _, n_heads, head_dim = attention_dims(config)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        new_kv = max(1, round(n_kv * keep))
        new_heads = max(new_kv, round(n_heads * keep / new_kv) * new_kv)
        out.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    return out


@register
class Narrow(Variant):
    name = "narrow"
    help = "the dense step of a model with MLP intermediate size × (1 − ρ) (neuron omission ceiling)"

    def config_overrides(self, config: Any, *, omit: float) -> dict[str, Any]:
        return narrow_overrides(config, omit, heads=False)


@register
class NarrowHeads(Variant):
    name = "narrow_heads"
    help = "as narrow, and attention heads (query and KV) × (1 − ρ), head_dim kept"

    def config_overrides(self, config: Any, *, omit: float) -> dict[str, Any]:
        return narrow_overrides(config, omit, heads=True)


# Centrifuge's own token-sparse backward (skipped where centrifuge.apply is missing).


def _centrifuge_missing() -> str | None:
    try:
        import centrifuge
    except Exception as err:  # pragma: no cover - the package itself is importable wherever this runs
        return f"centrifuge not importable: {err}"
    if not callable(getattr(centrifuge, "apply", None)):
        return "centrifuge.apply is not available in this checkout"
    return None


class _CentrifugeVariant(Variant):
    """``centrifuge.apply(model, mode=...)`` in prepare, ``revert`` in cleanup."""

    uses_keep = True
    mode: ClassVar[str] = "fast"
    compile: ClassVar[bool | None] = None  # apply's default: compiled element-wise ops on CUDA
    attention: ClassVar[str] = "auto"
    unavailable = classmethod(lambda cls: _centrifuge_missing())
    work = token_sparse_work

    def prepare(self, run: Run) -> None:
        import centrifuge

        centrifuge.apply(run.model, mode=self.mode, compile=self.compile, attention=self.attention)

    def cleanup(self, run: Run) -> None:
        import centrifuge

        centrifuge.revert(run.model)


@register
class CentrifugeBefore(_CentrifugeVariant):
    name = "centrifuge"
    help = "Centrifuge token-sparse backward, keep mask known before the forward (keep_mask=); apply defaults"

    def forward(self, run: Run) -> torch.Tensor:
        return run.model(input_ids=run.input_ids, labels=run.labels, keep_mask=run.keep).loss


@register
class CentrifugeOnLiger(CentrifugeBefore):
    name = "centrifuge_liger"
    help = "as centrifuge, on the model after Liger-Kernel's instance patch (dense_liger's), then centrifuge.apply"
    needs_cuda = True

    @classmethod
    def unavailable(cls) -> str | None:
        from centrifuge.models.liger import liger_available

        return _centrifuge_missing() or liger_available()

    def prepare(self, run: Run) -> None:
        from centrifuge.models.liger import LigerDense

        run.state["liger"] = LigerDense(run.model)
        super().prepare(run)

    def cleanup(self, run: Run) -> None:
        try:
            super().cleanup(run)
        finally:
            liger = run.state.pop("liger", None)
            if liger is not None:
                liger.revert()


@register
class CentrifugeEager(CentrifugeBefore):
    name = "centrifuge_eager"
    help = "as centrifuge, with the element-wise ops eager (apply(compile=False))"
    compile = False


@register
class CentrifugeCompiled(CentrifugeBefore):
    name = "centrifuge_compiled"
    help = "as centrifuge, with RMSNorm / RoPE / SwiGLU of the token-sparse layers compiled (apply(compile=True))"
    compile = True


@register
class CentrifugeStock(CentrifugeBefore):
    name = "centrifuge_sdpa"
    help = "as centrifuge, with stock attention kernels only (SDPA backend: full-row attention backward)"
    attention = "sdpa"


@register
class CentrifugeStockCompiled(CentrifugeStock):
    name = "centrifuge_sdpa_compiled"
    help = "as centrifuge_sdpa, with RMSNorm / RoPE / SwiGLU compiled"
    compile = True


@register
class CentrifugeOmit(CentrifugeBefore):
    name = "centrifuge_omit"
    help = ("as centrifuge, plus neuron omission at rate ρ (--omit) of MLP channels and KV-group heads (uniform "
            "importance, sampled, multiples of 64), a new plan every step, AdamW protected")

    def prepare(self, run: Run) -> None:
        from centrifuge import neurons

        super().prepare(run)
        run.state["omitter"] = neurons.attach(run.model, rate=run.omit, metric="uniform", select="sample",
                                              multiple=64, mlp=True, heads=True, seed=run.seed)
        run.state["step"] = 0

    def setup_optimizer(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        run.state["omitter"].protect(optimizer)

    def forward(self, run: Run) -> torch.Tensor:
        run.state["omitter"].plan(run.state["step"])
        run.state["step"] += 1
        return super().forward(run)

    def cleanup(self, run: Run) -> None:
        omitter = run.state.pop("omitter", None)
        if omitter is not None:
            omitter.revert()
        super().cleanup(run)


@register
class CentrifugeSelect(_CentrifugeVariant):
    name = "centrifuge_select"
    help = "Centrifuge token-sparse backward, top-κ of the current per-token loss chosen after the forward"

    def prepare(self, run: Run) -> None:
        super().prepare(run)
        run.state["select"] = topk_selector(run.keep_ratio)

    def forward(self, run: Run) -> torch.Tensor:
        return run.model(input_ids=run.input_ids, labels=run.labels, select=run.state["select"]).loss


@register
class CentrifugeLossOnly(_CentrifugeVariant):
    name = "centrifuge_loss_only"
    help = "centrifuge.apply(mode='loss_only'): masked loss through the patched forward, full backward"
    mode = "loss_only"
    work = full_work

    def forward(self, run: Run) -> torch.Tensor:
        return run.model(input_ids=run.input_ids, labels=run.labels, keep_mask=run.keep).loss


# The strong dense baselines run by default: ratios are to the fastest dense measured (dense_liger is skipped
# where liger-kernel or CUDA is missing).
DEFAULT_VARIANTS = ("dense", "loss_only", "ideal", "narrow", "narrow_heads", "dense_compiled", "dense_liger",
                    "centrifuge")

# --------------------------------------------------------------------------------------------------------
# Modifiers and variant specs ("ideal+ckpt")
# --------------------------------------------------------------------------------------------------------


def _ckpt_on(run: Run) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant."""
    from centrifuge.models.checkpointing import enable_activation_checkpointing

    enable_activation_checkpointing(run.model)
    run.model.train()


def _ckpt_off(run: Run) -> None:
    from centrifuge.models.checkpointing import disable_activation_checkpointing

    disable_activation_checkpointing(run.model)


@dataclasses.dataclass(frozen=True)
class Modifier:
    """A change that applies to any variant: model shape (``config_overrides``) and/or a model state."""

    name: str
    help: str
    config_overrides: Callable[[Any, float], dict[str, Any]] | None = None
    enable: Callable[[Run], None] | None = None
    disable: Callable[[Run], None] | None = None


MODIFIERS: dict[str, Modifier] = {
    "ckpt": Modifier("ckpt", "activation checkpointing (HF, use_reentrant=False)", enable=_ckpt_on,
                     disable=_ckpt_off),
    "narrow": Modifier("narrow", "MLP intermediate × (1 − ρ)",
                       config_overrides=lambda c, omit: narrow_overrides(c, omit, heads=False)),
    "narrow_heads": Modifier("narrow_heads", "MLP intermediate and attention heads × (1 − ρ)",
                             config_overrides=lambda c, omit: narrow_overrides(c, omit, heads=True)),
}


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A registered variant plus modifiers, e.g. ``ideal+narrow_heads+ckpt``."""

    base: str
    modifiers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "+".join((self.base, *self.modifiers))

    @property
    def cls(self) -> type[Variant]:
        return VARIANTS[self.base]

    def instantiate(self) -> Variant:
        return self.cls()

    def config_overrides(self, config: Any, *, omit: float) -> dict[str, Any]:
        """Variant's config changes, then each modifier's (later ones win)."""
        out = dict(self.instantiate().config_overrides(config, omit=omit))
        for mod in self.modifiers:
            fn = MODIFIERS[mod].config_overrides
            if fn is not None:
                out.update(fn(config, omit))
        return out

    def enable(self, run: Run, variant: Variant) -> None:
        """Modifiers on, then ``variant.prepare``."""
        for mod in self.modifiers:
            if MODIFIERS[mod].enable is not None:
                MODIFIERS[mod].enable(run)
        variant.prepare(run)

    def disable(self, run: Run, variant: Variant) -> None:
        """``variant.cleanup``, then modifiers off (reverse order)."""
        try:
            variant.cleanup(run)
        finally:
            for mod in reversed(self.modifiers):
                if MODIFIERS[mod].disable is not None:
                    MODIFIERS[mod].disable(run)


def parse_variant(text: str) -> VariantSpec:
    """``"ideal+ckpt"`` -> VariantSpec("ideal", ("ckpt",)); raises ValueError on unknown names."""
    base, *mods = [p.strip() for p in text.strip().split("+")]
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {base!r}; registered: {', '.join(VARIANTS)}")
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"unknown modifier {mod!r} in {text!r}; modifiers: {', '.join(MODIFIERS)}")
    return VariantSpec(base, tuple(dict.fromkeys(mods)))


def parse_variants(text: str) -> list[VariantSpec]:
    """Comma list of specs; ``all`` = every registered variant, ``default`` = DEFAULT_VARIANTS. A
    modifier on ``all``/``default`` applies to each (``all+ckpt``). Duplicates are dropped."""
    specs: list[VariantSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        head, _, tail = item.partition("+")
        if head in ("all", "default"):
            names = list(VARIANTS) if head == "all" else list(DEFAULT_VARIANTS)
            specs.extend(parse_variant(f"{n}+{tail}" if tail else n) for n in names)
        else:
            specs.append(parse_variant(item))
    return list(dict.fromkeys(specs))


def describe_variants() -> str:
    """Human-readable list of the registered variants and modifiers."""
    lines = ["variants:"]
    for name, cls in VARIANTS.items():
        why = cls.unavailable()
        flag = " [per --keep]" if cls.uses_keep else ""
        lines.append(f"  {name:22s}{cls.help}{flag}" + (f"  (unavailable: {why})" if why else ""))
    lines.append("modifiers (append with '+', e.g. ideal+ckpt):")
    lines.extend(f"  +{m.name:21s}{m.help}" for m in MODIFIERS.values())
    return "\n".join(lines)

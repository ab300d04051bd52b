"""The `centrifuge train` configuration: YAML file + ``--set section.key=value`` overrides.

A config is a ``Config`` holding one dataclass per *section* (``model``, ``data``, ``train``, ``eval``,
``checkpoint``, ``log``). The sections are the fields of ``Config``; that dataclass *is* the registry.

Adding a section (e.g. ``tokens`` for token filtering) takes a few lines:

1. write a dataclass whose fields all have defaults (types: int, float, bool, str, ``X | None``, dict, list),
   optionally with a ``validate(self) -> None`` that raises ``ConfigError("tokens.key: ...")``;
2. add one field to ``Config``: ``tokens: TokensSection = field(default_factory=TokensSection)``;
3. document its keys in ``configs/default.yaml`` (a test checks that file lists every key with its default).

Loading never half-succeeds: all unknown keys are reported in one ``ConfigError`` naming each key and the
closest valid one, and nothing is written before the whole config has been read and validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.resources
import math
import os
import re
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from centrifuge.train.errors import ConfigError

# ----------------------------------------------------------------------------------------------- sections

FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, without importing torch here
REFERENCE_SELECTORS = ("excess_loss", "reference_loss", "threshold")  # selectors that read reference losses


@dataclass
class ModelSection:
    """Which model to train: a preset shape with random init, or a local Hugging Face model directory."""

    preset: str = "tiny"  # a name from centrifuge.models.presets.PRESETS (ignored when `path` is set)
    path: str | None = None  # local HF model directory (config.json + safetensors); nothing is downloaded
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields replaced in the preset
    trust_remote_code: bool = False  # only for `path`; runs code shipped with the model when true
    attn_implementation: str = "sdpa"
    # Liger-Kernel's fused RoPE, RMSNorm, SwiGLU and linear cross-entropy on the model (its instance patch, as
    # Trainer(use_liger_kernel=True) applies): the fastest dense step on CUDA. Needs CUDA and liger-kernel.
    liger: bool = False

    def validate(self) -> None:
        from centrifuge.models.presets import PRESETS

        if self.path is None and self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"model.preset: unknown preset {self.preset!r}{hint} (choose one of: {', '.join(PRESETS)})"
            )
        if self.path is not None and self.overrides:
            raise ConfigError("model.overrides applies to presets only, not to a model from model.path")
        # "org/repo" names a Hub kernel, which transformers downloads and runs as code: never from a config
        # (which may come from a run directory); only the built-in attention implementations.
        if not re.fullmatch(r"[a-z0-9_|]+", self.attn_implementation):
            raise ConfigError(f"model.attn_implementation {self.attn_implementation!r}: only built-in "
                              "implementations (sdpa, eager, flash_attention_2, flex_attention, ...) are loaded; "
                              "Hub kernels ('org/repo') run downloaded code")


@dataclass
class DataSection:
    """Training text, its tokenizer, and how it is packed into fixed-length sequences."""

    path: str | None = None  # file, directory or glob of .txt/.jsonl/.parquet; None = built-in Python docs
    seq_len: int = 256  # tokens per packed sequence
    eval_fraction: float = 0.1  # share of documents (by characters) held out for evaluation; 0 = none
    text_field: str = "text"  # .jsonl / .parquet column with plain text
    txt_split: str = "file"  # .txt documents: "file" (one per file) or "paragraph" (split on blank lines)
    tokenizer: str = "auto"  # "auto" (the model directory's, else train one), "train", or a local path
    cache_dir: str | None = None  # trained-tokenizer cache; None = $CENTRIFUGE_CACHE or ~/.cache/centrifuge
    token_cache: str | None = None  # tokenize once into this directory, memory-map rows from it; None = in memory

    def validate(self) -> None:
        _require(self.seq_len >= 2, "data.seq_len", "must be at least 2", self.seq_len)
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)", self.eval_fraction)
        _require_choice(self.txt_split, "data.txt_split", ("file", "paragraph"))
        _require(bool(self.text_field), "data.text_field", "must not be empty", self.text_field)


@dataclass
class TrainSection:
    """Optimisation: AdamW, linear warm-up then cosine decay, gradient accumulation and clipping."""

    out_dir: str = "runs/{time}"  # run directory; "{time}" becomes the start time (YYYYmmdd-HHMMSS)
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch (the global one: torchrun's ranks take equal shares)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20
    weight_decay: float = 0.1  # applied to matrices only (not to norms or biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0  # model init, data order and every RNG; CPU runs are bit-for-bit reproducible
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    distributed: str = "auto"  # under torchrun: "auto" (= ddp), "ddp" or "fsdp2"; one process: ignored
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (kept rows only)
    # fsdp2 only: free each layer's all-gathered weights after its forward (FSDP2's default) or keep them
    # to the backward (false: one all-gather per layer and step instead of two, more memory)
    fsdp_reshard_after_forward: bool = True
    fsdp_prefetch: int = 0  # fsdp2 only: 0 = FSDP2's implicit prefetch; k >= 1 = all-gather k layers ahead

    def validate(self) -> None:
        from centrifuge.train.distributed import STRATEGIES

        _require_choice(self.distributed, "train.distributed", STRATEGIES)
        _require(self.steps >= 1, "train.steps", "must be at least 1", self.steps)
        _require(self.fsdp_prefetch >= 0, "train.fsdp_prefetch", "must be >= 0 (0 = FSDP2's implicit prefetch)",
                 self.fsdp_prefetch)
        _require(self.batch_size >= 1, "train.batch_size", "must be at least 1", self.batch_size)
        _require(self.grad_accum >= 1, "train.grad_accum", "must be at least 1", self.grad_accum)
        _require(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be a positive number", self.lr)
        # AdamW multiplies every decayed weight by (1 - lr * weight_decay) each step: at 1 or more the
        # weights flip sign or vanish every step, which no run means to do.
        _require(self.lr * self.weight_decay < 1.0, "train.weight_decay",
                 f"times train.lr ({self.lr:g}) must be below 1 (AdamW scales weights by 1 - lr * weight_decay)",
                 self.weight_decay)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _require(0.0 <= self.beta1 < 1.0, "train.beta1", "must be in [0, 1)", self.beta1)
        _require(0.0 <= self.beta2 < 1.0, "train.beta2", "must be in [0, 1)", self.beta2)
        # AdamW's state is float32: a smaller eps rounds to 0 there and the update divides by zero.
        _require(self.eps >= FLOAT32_TINY, "train.eps", f"must be at least {FLOAT32_TINY:.3g} (float32's smallest "
                 "normal number; AdamW's state is float32)", self.eps)
        _require(
            self.max_grad_norm >= 0,
            "train.max_grad_norm",
            "must be >= 0 (0 = no clipping)",
            self.max_grad_norm,
        )
        _require(bool(self.out_dir), "train.out_dir", "must not be empty", self.out_dir)
        _require_choice(self.precision, "train.precision", ("auto", "bf16", "fp32"))
        _require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "train.device",
            "must be 'auto', 'cpu' or 'cuda[:N]'",
            self.device,
        )


@dataclass
class EvalSection:
    """Held-out loss and perplexity, at step 0, every `every` steps and at the end."""

    every: int = 50  # 0 = only before the first and after the last step
    batch_size: int | None = None  # None = train.batch_size
    max_batches: int = 0  # 0 = the whole held-out split

    def validate(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0", self.every)
        _require(
            self.batch_size is None or self.batch_size >= 1,
            "eval.batch_size",
            "must be >= 1",
            self.batch_size,
        )
        _require(self.max_batches >= 0, "eval.max_batches", "must be >= 0", self.max_batches)


@dataclass
class CheckpointSection:
    """Checkpoints in <out_dir>/checkpoints/step-NNNNNNN; the last one is always written."""

    every: int = 100  # 0 = only at the end (and on SIGINT/SIGTERM)
    keep: int = 2  # how many of the newest checkpoints to keep
    # "auto" (sharded under train.distributed=fsdp2, full otherwise), "full" (one set of files, written by
    # rank 0) or "sharded" (every rank writes its shards through torch.distributed.checkpoint)
    format: str = "auto"
    # sharded checkpoints: when to add model.safetensors (full weights gathered onto rank 0, for
    # from_pretrained): "every" checkpoint or only the "last" one of the run (the final step or a stop signal)
    full_weights: str = "every"

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0", self.every)
        _require(self.keep >= 1, "checkpoint.keep", "must be at least 1", self.keep)
        _require_choice(self.format, "checkpoint.format", ("auto", "full", "sharded"))
        _require_choice(self.full_weights, "checkpoint.full_weights", ("every", "last"))


@dataclass
class LogSection:
    """Progress bar, metrics.jsonl, TensorBoard (when the `tensorboard` package is importable), a PNG."""

    every: int = 10  # steps between metrics.jsonl / TensorBoard records
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True
    plot: bool = True  # <out_dir>/metrics.png at the end of the run (centrifuge plot)

    def validate(self) -> None:
        _require(self.every >= 1, "log.every", "must be at least 1", self.every)


@dataclass
class TokensSection:
    """Token filtering: the backward runs on the kept tokens only (Centrifuge). ``keep_ratio: 1.0`` (with a
    ratio-based selector) is ordinary dense training."""

    keep_ratio: float = 0.5  # share of labelled tokens kept (the schedule's start value)
    selector: str = "random"  # random | label_mask | self_loss | excess_loss | reference_loss | threshold
    scope: str = "sequence"  # sequence | batch: where the top-k is taken
    mode: str = "fast"  # fast (token-sparse backward) | reference (the oracle) | loss_only (masked loss)
    selector_params: dict[str, Any] = field(default_factory=dict)  # e.g. {seed: 0} or {tau: 0.5}
    schedule: str = "constant"  # constant | linear | cosine | ladder, over the run's steps
    schedule_params: dict[str, Any] = field(default_factory=dict)  # e.g. {end: 0.3} (start = keep_ratio)
    attention: str = "auto"  # attention backend of the fast path: auto | math | flash | sdpa | triton
    compile: bool | None = None  # torch.compile the fast path's norms / RoPE / SwiGLU; null = on CUDA
    reference_scores: str | None = None  # directory written by `centrifuge score-reference`
    reference_model: str | None = None  # local model directory: score online, one no-grad forward a step

    def validate(self) -> None:
        from centrifuge.ops.attention import BACKENDS
        from centrifuge.schedules import KINDS
        from centrifuge.tokens.forward import MODES
        from centrifuge.tokens.selectors import SCOPES, SELECTORS

        _require(0.0 < self.keep_ratio <= 1.0, "tokens.keep_ratio", "must be in (0, 1]", self.keep_ratio)
        _require_choice(self.selector, "tokens.selector", list(SELECTORS))
        _require_choice(self.scope, "tokens.scope", list(SCOPES))
        _require_choice(self.mode, "tokens.mode", list(MODES))
        _require_choice(self.schedule, "tokens.schedule", list(KINDS))
        _require_choice(self.attention, "tokens.attention", ["auto", *BACKENDS])
        if self.reference_scores is not None and self.reference_model is not None:
            raise ConfigError("tokens: set reference_scores or reference_model, not both")
        uses_reference = self.selector in REFERENCE_SELECTORS
        if uses_reference and not (self.reference_scores or self.reference_model):
            raise ConfigError(
                f"tokens.selector: {self.selector!r} ranks by a reference model's losses; set "
                "tokens.reference_scores (from `centrifuge score-reference`) or tokens.reference_model"
            )
        if not uses_reference and (self.reference_scores or self.reference_model):
            key = "reference_scores" if self.reference_scores else "reference_model"
            raise ConfigError(
                f"tokens.{key} is set but tokens.selector={self.selector!r} does not use reference losses; "
                f"remove tokens.{key} or set tokens.selector to one of {', '.join(REFERENCE_SELECTORS)}"
            )
        if self.selector == "threshold" and "tau" not in self.selector_params:
            raise ConfigError("tokens.selector 'threshold' keeps tokens whose excess loss exceeds tau; set "
                              "tokens.selector_params={tau: 0.5} (any number)")


@dataclass
class NeuronsSection:
    """Neuron omission (SAT): each step only the more important MLP channels and attention heads (whole KV
    groups) take part, through smaller dense GEMMs. ``rate: 0`` (the default) is off. The keys mirror
    ``centrifuge.neurons.OmissionConfig``; the default ladder schedule (LORS) ends dense."""

    rate: float = 0.0  # omission rate (the schedule's start value); 0 = off
    schedule: str = "ladder"  # ladder (LORS) | constant | linear | cosine, over the run's steps
    end: float = 0.0  # the schedule's final rate (not for constant)
    hold_fraction: float = 0.5  # ladder: share of the steps at `rate` before stepping down
    rungs: int = 4  # ladder: equal steps from `rate` down to `end`
    metric: str = "activation"  # uniform | magnitude | wanda | activation (EMA of earlier forwards)
    select: str = "sample"  # sample (p ∝ softmax(score / temperature)) | topk
    temperature: float = 1.0
    mlp: bool = True  # omit MLP channels
    heads: bool = True  # omit attention heads (whole KV groups)
    multiple: int = 64  # kept MLP channels rounded up to a multiple of this
    layers: list[int] | None = None  # decoder layers that omit; null = all
    ema: float = 0.9  # decay of the importance statistics
    stat_tokens: int = 4096  # the statistics read at most this many tokens of a forward (evenly strided); 0 = all
    seed: int = 0
    protect_optimizer: bool = True  # omitted rows and their AdamW state do not move in a step

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def omission_config(self):
        """The ``centrifuge.neurons.OmissionConfig`` of this section (raises ``ValueError`` when bad)."""
        from centrifuge.neurons.omitter import OmissionConfig

        fields = dataclasses.asdict(self)
        fields.pop("protect_optimizer")
        return OmissionConfig(**fields)

    def validate(self) -> None:
        try:
            self.omission_config()
        except ValueError as err:
            raise ConfigError(str(err) if str(err).startswith("neurons") else f"neurons: {err}") from None


# ------------------------------------------------------------------------------------ the section registry


@dataclass
class Config:
    """A whole run's configuration. Each field is a section: its name is the YAML top-level key."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    tokens: TokensSection = field(default_factory=TokensSection)
    neurons: NeuronsSection = field(default_factory=NeuronsSection)

    def validate(self) -> None:
        for name in section_names():
            section = getattr(self, name)
            # NaN and inf pass most range checks (nan >= 0 is False, but inf >= 0 is True): refuse them
            # once for every float key, before the sections check their ranges.
            for key, hint in section_keys(type(section)).items():
                value = getattr(section, key)
                if _is_float_hint(hint) and isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{name}.{key} must be a finite number (got {value!r})")
            if hasattr(section, "validate"):
                section.validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def section_types() -> dict[str, type]:
    """Section name -> its dataclass, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in section_names()}


def section_keys(section_type: type) -> dict[str, Any]:
    """Key name -> resolved type hint of one section dataclass."""
    hints = typing.get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)}


def all_keys() -> list[str]:
    """Every valid ``section.key``."""
    return [f"{s}.{k}" for s, t in section_types().items() for k in section_keys(t)]


# ------------------------------------------------------------------------------------------------- loading


def default_config_path() -> str:
    """The built-in default config (package data), used when no CONFIG file is given."""
    return str(importlib.resources.files("centrifuge").joinpath("configs/default.yaml"))


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (or the built-in default), apply ``overrides`` (``"section.key=value"``), validate.

    Override values are parsed as YAML scalars, so ``train.lr=1e-3``, ``log.progress=false`` and
    ``model.overrides={num_hidden_layers: 2}`` all work. Raises ``ConfigError``; writes nothing."""
    source = path if path is not None else default_config_path()
    raw = read_yaml_mapping(source)
    check_known_keys(raw, source=os.path.basename(source))
    check_known_keys(apply_overrides({}, overrides), source="--set")
    return config_from_dict(apply_overrides(raw, overrides), source=os.path.basename(source))


def read_yaml_mapping(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of sections (model:, data:, train:, ...)")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``"section.key=value"`` (or ``section.dictkey.sub=value``) set."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        name, sep, text = item.partition("=")
        parts = name.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set train.steps=100")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: keep the raw string; the type check below decides
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"config section {parts[0]!r} must be a mapping")
        if len(parts) == 2:
            section[parts[1]] = value
        else:  # section.key.sub=value: only for dict-typed keys such as model.overrides
            target = section.setdefault(parts[1], {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {name}: {'.'.join(parts[:2])} is not a mapping")
            section[parts[1]] = target = dict(target)
            for part in parts[2:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Build and validate a ``Config`` from plain data; unknown keys and bad values raise ``ConfigError``."""
    check_known_keys(raw, source=source)
    types_ = section_types()
    sections = {}
    for name, section_type in types_.items():
        given = raw.get(name) or {}
        keys = section_keys(section_type)
        values = {key: _coerce(given[key], keys[key], f"{name}.{key}") for key in given}
        sections[name] = section_type(**values)
    config = Config(**sections)
    config.validate()
    return config


def check_known_keys(raw: dict[str, Any], *, source: str) -> None:
    """One ``ConfigError`` listing every unknown section / key of ``raw`` with the closest valid name."""
    types_ = section_types()
    unknown: list[str] = []
    for name, value in raw.items():
        if name not in types_:
            unknown.append(_describe_unknown(str(name), None))
        elif value is not None and not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {value!r}")
        else:
            keys = section_keys(types_[name])
            unknown += [_describe_unknown(str(k), name) for k in (value or {}) if k not in keys]
    if unknown:
        noun = "key" if len(unknown) == 1 else "keys"
        raise ConfigError(f"unknown config {noun} in {source}: " + "; ".join(unknown))


# Names other trainers use, which difflib would not connect to ours.
_ALIASES = {
    "learning_rate": "train.lr",
    "max_steps": "train.steps",
    "gradient_accumulation_steps": "train.grad_accum",
    "micro_batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "max_seq_length": "data.seq_len",
    "seq_length": "data.seq_len",
    "block_size": "data.seq_len",
    "output_dir": "train.out_dir",
}


def _describe_unknown(key: str, section: str | None) -> str:
    """``'train.lerning_rate' (did you mean 'train.lr'?)`` — the closest valid key by difflib."""
    types_ = section_types()
    if section is None:
        close = difflib.get_close_matches(key, list(types_), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid sections: {', '.join(types_)})"
        return f"section {key!r}{hint}"
    dotted = f"{section}.{key}"
    elsewhere = [f"{s}.{key}" for s, t in types_.items() if key in section_keys(t)]
    if elsewhere:
        return f"{dotted!r} (did you mean {elsewhere[0]!r}?)"
    # This section's keys and the other trainers' names for them, misspelt or not.
    candidates = {k: f"{section}.{k}" for k in section_keys(types_[section])}
    candidates.update(_ALIASES)
    own = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if own:
        return f"{dotted!r} (did you mean {candidates[own[0]]!r}?)"
    others = {k: f"{s}.{k}" for s, t in types_.items() for k in section_keys(t)}
    close = difflib.get_close_matches(key, list(others), n=1, cutoff=0.6)
    if close:
        return f"{dotted!r} (did you mean {others[close[0]]!r}?)"
    return f"{dotted!r} (valid keys in {section}: {', '.join(section_keys(types_[section]))})"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting where it is unambiguous (int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --set train.out_dir=2024
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, e.g. {{name: value}}, got {value!r}")
    if origin is list or hint is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _is_float_hint(hint: Any) -> bool:
    """Whether a key's type hint is ``float`` or ``float | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return float in typing.get_args(hint)
    return hint is float


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message} (got {value!r})")


def _require_choice(value: str, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))} (got {value!r})")


# --------------------------------------------------------------------------------------------- helpers


def resolve_out_dir(template: str, *, now: float | None = None) -> str:
    """``runs/{time}`` -> ``runs/20260101-120000`` (local time), or ``runs/20260101-120000-2`` etc. when a
    run of the same second exists already."""
    if "{time}" not in template:
        return template
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    path, n = template.replace("{time}", stamp), 1
    while os.path.exists(path):
        n += 1
        path = template.replace("{time}", f"{stamp}-{n}")
    return path


def time_run_dirs(template: str) -> list[str]:
    """Existing directories made from a ``{time}`` template, oldest first."""
    pattern = re.compile(re.escape(template).replace(re.escape("{time}"), r"(\d{8}-\d{6})(?:-(\d+))?"))
    found = []
    for path in glob.glob(template.replace("{time}", "*")):
        match = pattern.fullmatch(path)
        if match and os.path.isdir(path):
            found.append(((match.group(1), int(match.group(2) or 1)), path))
    return [path for _, path in sorted(found)]


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

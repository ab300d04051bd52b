"""A whole `centrifuge train` run: set-up, the step loop, evaluation, checkpoints, interruption.

``prepare_run`` checks everything a user can get wrong (config, model, data, checkpoint) and builds model,
optimizer and data *before* the first write, so bad input ends with one ``TrainError`` and leaves the run
directory as it was. ``execute_run`` then writes the run:

    eval (step 0) -> [train_step -> metrics -> eval every K -> checkpoint every C] x steps -> eval, checkpoint

SIGINT / SIGTERM during the loop finish the current step, save a checkpoint and return (exit code
128 + signal number); a second signal interrupts at once (the atomic checkpoint writer leaves no debris).
Under torchrun the ranks agree on the signal without a per-step sync (``SignalVote``), so they stop one
step later: after the step following the one during which the signal came.

Under ``torchrun --nproc-per-node N`` every rank runs this same code (``centrifuge.train.distributed``):
each takes its share of every global micro-batch, the model is wrapped per ``train.distributed`` (DDP or
FSDP2), and only rank 0 prints, logs metrics and writes the run directory and checkpoints.

Plug-ins (token filtering, neuron omission) receive a ``RunContext`` once the model and optimizer exist and
may replace its ``loss_fn`` or add ``hooks``; ``default_plugins`` lists the ones built from config sections.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from centrifuge.train import checkpoint as ckpt
from centrifuge.train import distributed
from centrifuge.train.banner import maybe_probe, setup_line, speed_lines
from centrifuge.train.config import (
    Config,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    resolve_out_dir,
    time_run_dirs,
)
from centrifuge.train.data import (
    Datasets,
    Document,
    SequenceSampler,
    build_datasets,
    eval_batches,
    read_documents,
    split_documents,
)
from centrifuge.train.errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingStoppedError
from centrifuge.train.metrics import MetricsLogger, Progress, RunClock, step_record
from centrifuge.train.step import LossFn, StepHooks, dense_loss, evaluate, fused_dense_loss, train_step
from centrifuge.train.tokenizer import TextTokenizer, cached_bpe, has_tokenizer, load_tokenizer

TOKENIZER_DIR = "tokenizer"


@dataclass
class RunContext:
    """What plug-ins see before the first step; they may set ``loss_fn`` and extend ``hooks``."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    loss_fn: LossFn = dense_loss
    hooks: StepHooks = field(default_factory=StepHooks)
    data: Datasets | None = None  # packed train / eval sequences (e.g. to check reference scores against)
    tokenizer: TextTokenizer | None = None
    say: Callable[[str], None] = print  # set-up messages of plug-ins
    train_model: nn.Module | None = None  # what train_step drives when it is not `model` (a DDP wrapper)
    dist: distributed.Distributed = field(default_factory=distributed.Distributed)  # this rank's place
    # name -> object with state_dict() / load_state_dict() of tensors, saved in every checkpoint
    plugin_state: dict[str, Any] = field(default_factory=dict)


Plugin = Callable[[RunContext], None]


def default_plugins() -> list[Plugin]:
    """Plug-ins configured by config sections (token filtering and neuron omission register here)."""
    from centrifuge.neurons.training import neuron_omission_plugin
    from centrifuge.tokens.training import token_filter_plugin

    return [token_filter_plugin, neuron_omission_plugin]


@dataclass
class EvalPoint:
    step: int
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def describe(self) -> str:
        return f"eval loss {self.loss:.4f} (perplexity {self.perplexity:.1f}) at step {self.step}"


@dataclass
class RunResult:
    run_dir: str
    step: int  # optimizer steps completed
    first_eval: EvalPoint | None
    last_eval: EvalPoint | None
    checkpoint: str | None
    stop_signal: int | None = None  # SIGINT / SIGTERM number when the run was interrupted
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 128 + self.stop_signal if self.stop_signal else 0


# ------------------------------------------------------------------------------------------ run directory


def load_run_config(config_path: str | None, overrides: Sequence[str] = (), *, resume: bool = False) -> Config:
    """The CLI's config: CONFIG (or the built-in default) + overrides.

    With ``resume`` and no CONFIG file, the base is the config saved in the run's newest checkpoint, so
    ``centrifuge train --resume`` continues a run exactly as it was started."""
    config = load_config(config_path, overrides)
    if resume and config_path is None:
        run_dir = find_run_dir(config.train.out_dir, resume=True)
        saved = ckpt.read_state(ckpt.latest_checkpoint(run_dir)).get("config")
        if isinstance(saved, dict):
            saved = _without_code_settings(saved, overrides)
            config = config_from_dict(apply_overrides(saved, overrides), source="the checkpoint's config")
    return config


def _stated_keys(overrides: Sequence[str]) -> set[str]:
    """The ``section.key`` names the command line sets (``--set model.overrides.x=1`` sets model.overrides)."""
    return {".".join(item.partition("=")[0].strip().split(".")[:2]) for item in overrides}


def _without_code_settings(saved: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The saved config of a run with ``model.trust_remote_code`` taken from the command line only.

    A run directory is data: whoever can write its ``state.json`` must not be able to make ``--resume`` run
    Python code. So the saved ``trust_remote_code`` is never used (it becomes false); a run that needs it
    must be resumed with ``--set model.trust_remote_code=true --set model.path=DIR`` (or a CONFIG file), so
    that both the permission and the directory whose code runs come from the user. Every other path of the
    saved config (``model.path``, ``data.path``, ``tokens.reference_*``) is only read as data: config JSON
    and safetensors weights, never remote code (see ``_check_weights_are_safetensors``)."""
    stated = _stated_keys(overrides)
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    saved_trust = model.get("trust_remote_code") is True
    stated_trust = apply_overrides({"model": {}}, overrides)["model"].get("trust_remote_code") is True
    if (stated_trust and "model.path" not in stated) or (saved_trust and "model.trust_remote_code" not in stated):
        missing = [key for key in ("model.trust_remote_code", "model.path") if key not in stated]
        raise ConfigError(
            "--resume without a CONFIG file takes model.trust_remote_code and the model.path whose code it "
            f"runs from the command line only, never from the run directory; re-state "
            f"{' and '.join('--set ' + key + '=...' for key in missing)} (or pass the run's CONFIG file)"
        )
    return {**saved, "model": {**model, "trust_remote_code": False}}


def find_run_dir(template: str, *, resume: bool) -> str:
    """The run directory for ``train.out_dir``; raises if a fresh run would overwrite an earlier one.

    With ``resume`` a ``{time}`` template selects the newest run it matches that has a checkpoint."""
    if not resume:
        run_dir = resolve_out_dir(template)
        _check_writable_dir(run_dir)
        found = ckpt.list_checkpoints(run_dir)
        if found:
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoint of step {found[-1][0]}); add --resume to continue "
                "it, or pick another directory with --set train.out_dir=PATH"
            )
        return run_dir
    if "{time}" in template:
        runs = [d for d in time_run_dirs(template) if ckpt.list_checkpoints(d)]
        if not runs:
            raise CheckpointError(f"--resume: no run matching {template} has a checkpoint")
        return runs[-1]
    if not ckpt.list_checkpoints(template):
        raise CheckpointError(f"--resume: {template} holds no checkpoint to resume")
    return template


def _check_writable_dir(run_dir: str) -> None:
    """Refuse a ``train.out_dir`` that cannot become a directory: an existing file (or a file in its path),
    or a place this user may not write. Checked before anything is written."""
    path = os.path.abspath(run_dir)
    while True:
        if os.path.lexists(path):
            if not os.path.isdir(path):
                what = "is" if path == os.path.abspath(run_dir) else f"is inside {path}, which is"
                raise ConfigError(f"train.out_dir {run_dir!r} {what} a file, not a directory; "
                                  "pick another with --set train.out_dir=PATH")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"train.out_dir {run_dir!r}: {path} is not writable; "
                                  "pick another with --set train.out_dir=PATH")
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _check_resumable(config: Config, saved: dict[str, Any], where: str, step: int = 0) -> list[str]:
    """Raise if settings that shape the weights or the data order differ; return notes on other changes."""
    current = config.to_dict()
    fixed = {"model": None, "data": None, "train": ("seed", "batch_size", "grad_accum")}
    errors, notes = [], []
    for section, values in current.items():
        old_values = saved.get(section, {}) or {}
        for key, value in values.items():
            if key in ("out_dir", "cache_dir", "token_cache") or key not in old_values or old_values[key] == value:
                continue
            change = f"{section}.{key}: {old_values[key]!r} -> {value!r}"
            keys = fixed.get(section, ())
            shapes_run = section in fixed and (keys is None or key in keys) and key != "trust_remote_code"
            (errors if shapes_run else notes).append(change)
    if errors:
        raise ConfigError(
            f"cannot resume {where}: it was made with other settings ({'; '.join(errors)}); "
            "model, data, seed, batch_size and grad_accum must stay the same"
        )
    lr_note = _schedule_change_note(config, saved.get("train") or {}, int(step))
    return notes + ([lr_note] if lr_note else [])


def _schedule_change_note(config: Config, saved_train: dict[str, Any], step: int) -> str | None:
    """A line saying how the learning rate moves when a resume changes the schedule's settings.

    The rule: the schedule is a function of the *current* settings (``lr_factor``); a resumed run continues
    at its step count on the new curve. Extending ``train.steps`` of a finished run therefore stretches the
    cosine and the lr jumps back up (defaults: 3.0e-4 at step 30 of 30 -> 1.5e-3 at step 31 of 40); say so."""
    t = config.train
    keys = ("steps", "lr", "warmup_steps", "min_lr_ratio")
    try:
        old = {key: type(getattr(t, key))(saved_train.get(key, getattr(t, key))) for key in keys}
    except (TypeError, ValueError):
        return None
    if all(old[key] == getattr(t, key) for key in keys) or step < 1:
        return None
    last = old["lr"] * lr_factor(step - 1, warmup=old["warmup_steps"], total=old["steps"],
                                 min_ratio=old["min_lr_ratio"])
    nxt = t.lr * lr_factor(step, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
    return (f"learning-rate schedule: recomputed for the new train settings (warm-up {t.warmup_steps}, cosine "
            f"over {t.steps} steps); step {step} ran at lr {last:.3g}, step {step + 1} runs at {nxt:.3g}")


# ---------------------------------------------------------------------------------------------- building


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return torch.device(name)


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, none (fp32) on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def model_config(config: Config) -> Any:
    """The Hugging Face config of the model to train; checks ``data.seq_len`` against its maximum."""
    from transformers import AutoConfig

    from centrifuge.models.presets import preset_config

    m = config.model
    if m.path is not None:
        if not os.path.isdir(m.path):
            raise ConfigError(f"model.path {m.path!r} is not a directory (hub downloads are not used)")
        _check_weights_are_safetensors(m.path, "model.path")
        try:
            hf = AutoConfig.from_pretrained(m.path, local_files_only=True, trust_remote_code=m.trust_remote_code)
        except Exception as err:
            raise ConfigError(f"model.path {m.path!r}: cannot read its config ({' '.join(str(err).split())})") \
                from None
        what = f"model.path={m.path}"
    else:
        _check_override_names(m.preset, m.overrides)
        try:
            hf = preset_config(m.preset, **m.overrides)
        except Exception as err:  # transformers' config validators raise several types
            raise ConfigError(f"model.overrides: {' '.join(str(err).split())}") from None
        what = f"model.preset={m.preset}"
    _check_model_sizes(hf, "model.overrides" if m.path is None else f"model.path {m.path!r}")
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is not None and config.data.seq_len > max_pos:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is above the model's max_position_embeddings={max_pos} "
            f"({what}); lower data.seq_len"
        )
    return hf


def _check_weights_are_safetensors(directory: str, key: str) -> None:
    """Refuse a model directory without ``*.safetensors`` weights: ``transformers`` would fall back to
    ``pytorch_model.bin``, a pickle, and nothing this tool loads may be unpickled."""
    if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise ConfigError(f"{key} {directory!r} has no .safetensors weights (pickled .bin weights are never "
                          "loaded); convert them to safetensors or point the key at another directory")


def _check_override_names(preset: str, overrides: dict[str, Any]) -> None:
    """Refuse ``model.overrides`` keys that are not fields of the preset's config: Hugging Face configs
    accept any keyword and keep it as an attribute nobody reads, so a typo would change nothing silently."""
    import difflib

    from centrifuge.models.presets import preset_config

    fields = preset_config(preset).to_dict()
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.overrides: {unknown[0]!r} is not a field of the {preset!r} preset's "
                          f"{fields.get('model_type', '')} config{hint}")


# Sizes a causal LM needs at least one of; 0 builds a model that trains nothing (no layers) or crashes.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings")


def _check_model_sizes(hf: Any, where: str) -> None:
    """Every size of ``_POSITIVE_SIZES`` the config has must be a positive integer; query heads must split
    into the key/value heads (GQA)."""
    for name in _POSITIVE_SIZES:
        value = getattr(hf, name, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: {name} must be a positive integer (got {value!r})")
    heads, kv = getattr(hf, "num_attention_heads", None), getattr(hf, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ConfigError(f"{where}: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")


def build_model(config: Config, hf_config: Any) -> nn.Module:
    from centrifuge.models.checkpointing import enable_activation_checkpointing
    from centrifuge.models.presets import build_model as build_preset
    from centrifuge.models.presets import load_model

    m = config.model
    if m.path is not None:
        model = load_model(m.path, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
    else:
        model = build_preset(hf_config, attn_implementation=m.attn_implementation, seed=config.train.seed)
    if config.model.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)  # what Trainer(use_liger_kernel=True) applies
    if config.train.activation_checkpointing:  # the token-sparse layers then recompute on kept rows only
        enable_activation_checkpointing(model)
    return model


def check_liger(config: Config, device: torch.device) -> None:
    """``model.liger`` needs CUDA and liger-kernel, and a combination that has been tested (not omission)."""
    if not config.model.liger:
        return
    from centrifuge.models.liger import liger_available

    if device.type != "cuda":
        raise ConfigError(f"model.liger: Liger-Kernel's kernels run on CUDA only (this run's device is "
                          f"{device.type}); set model.liger=false")
    why = liger_available()
    if why:
        raise ConfigError(f"model.liger: {why}; or set model.liger=false")
    if config.neurons.enabled:
        raise ConfigError("model.liger: neuron omission computes its narrow MLP and attention itself and is not "
                          "tested on Liger-patched models; set neurons.rate=0 or model.liger=false")


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm weights and biases are not decayed)."""
    t = config.train
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CUDA the fused kernel: a few launches for all parameters instead of foreach's several per tensor list.
    fused = all(p.is_cuda for group in groups for p in group["params"]) or None
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the step after ``step`` completed ones: linear warm-up, then cosine
    from 1 down to ``min_ratio``, reached exactly at the last step."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already learns (lr/warmup, not 0)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    t = config.train

    def factor(step: int) -> float:
        return lr_factor(step, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def obtain_tokenizer(
    config: Config, train_docs: Sequence[Document], vocab_size: int, *, run_dir: str, resume: bool
) -> tuple[TextTokenizer, str]:
    """The run's tokenizer and a line describing it. A resumed run reuses the one saved in its run dir."""
    if resume:
        path = os.path.join(run_dir, TOKENIZER_DIR)
        if not os.path.isdir(path) or os.path.islink(path):
            raise CheckpointError(f"cannot resume {run_dir}: its {TOKENIZER_DIR}/ directory is missing")
        ckpt.tokenizer_files(path)  # plain files only: it is copied into every checkpoint
        tokenizer, how = load_run_tokenizer(path), f"from {path}"
    else:
        choice = config.data.tokenizer
        if choice == "auto":
            path = config.model.path
            choice = path if path is not None and has_tokenizer(path) else "train"
        if choice == "train":
            texts = [text for doc in train_docs for text, _ in doc.segments]
            start = time.perf_counter()
            tokenizer, cache_file, hit = cached_bpe(texts, vocab_size, cache_dir=config.data.cache_dir)
            how = (
                f"byte-level BPE from cache {cache_file}"
                if hit
                else f"byte-level BPE trained in {time.perf_counter() - start:.1f} s (cached in {cache_file})"
            )
        else:
            tokenizer, how = load_tokenizer(choice), f"from {choice}"
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab_size}")
    return tokenizer, f"{tokenizer.vocab_size} tokens, {how}"


def load_run_tokenizer(directory: str) -> TextTokenizer:
    """The tokenizer a run saved in its ``tokenizer/`` directory, read as data only: ``tokenizer.json``
    through the ``tokenizers`` library and the end-of-text token from ``tokenizer_config.json``, with no
    ``transformers`` class chosen by the files (a run directory decides no code)."""
    import json

    import tokenizers

    file = os.path.join(directory, "tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(file)
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except Exception as err:
        raise CheckpointError(f"cannot read the run's tokenizer in {directory} ({' '.join(str(err).split())})") \
            from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = backend.token_to_id(eos) if isinstance(eos, str) else None
    if eos_id is None:
        raise CheckpointError(f"the run's tokenizer in {directory} names no end-of-text token it knows ({eos!r})")
    return TextTokenizer(backend, eos_id)


def busy_cpu_note(device: torch.device) -> str | None:
    """A hint when other processes keep the CPU busy and torch's OpenMP threads spin-wait.

    Measured on 2 shared cores: a demo step took 4 s instead of 0.4 s, because every parallel region waits
    for a thread the OS has descheduled. ``OMP_WAIT_POLICY=PASSIVE`` (read when torch is first imported,
    so it must be set in the environment; ``make demo`` does) or one thread avoids it."""
    if device.type != "cpu" or torch.get_num_threads() < 2 or os.environ.get("OMP_WAIT_POLICY"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    return (
        f"note: the CPU is busy (load {load:.1f} on {cores} cores); spinning OpenMP threads can make training "
        "many times slower here. Set OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1 in the environment."
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- signals


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second signal acts at once

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class PreparedRun:
    """A run after set-up: everything validated and built, nothing written yet."""

    config: Config
    run_dir: str
    device: torch.device
    autocast_dtype: torch.dtype | None
    context: RunContext  # model, optimizer, scheduler, loss_fn, hooks
    data: Datasets
    sampler: SequenceSampler
    tokenizer: TextTokenizer
    tokenizer_note: str
    start_step: int = 0
    state: dict[str, Any] | None = None  # the checkpoint's state.json when resuming
    resume_from: str | None = None
    notes: list[str] = field(default_factory=list)  # settings changed since the checkpoint
    dist: distributed.Distributed = field(default_factory=distributed.Distributed)
    probe: Any = None  # centrifuge.train.banner.ProbeResult: dense vs token-sparse step time, CPU runs only


def prepare_run(config: Config, *, resume: bool = False, plugins: Sequence[Plugin] | None = None) -> PreparedRun:
    """Check everything a user can get wrong and build model, optimizer, data. Writes nothing (except the
    shared tokenizer cache). Raises ``TrainError`` subclasses."""
    config.validate()
    device, info = start_distributed(config)
    run_dir = _rank_zero_value(find_run_dir(config.train.out_dir, resume=resume), info)  # one `{time}` for all
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    state, notes = None, []
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        notes = _check_resumable(config, state.get("config") or {}, resume_from, state["step"])
    hf_config = model_config(config)
    docs, source = read_documents(config.data)
    train_docs, eval_docs = split_documents(docs, config.data.eval_fraction, seed=config.train.seed)

    if config.tokens.reference_model and os.path.isdir(config.tokens.reference_model):
        _check_weights_are_safetensors(config.tokens.reference_model, "tokens.reference_model")

    check_liger(config, device)
    seed_everything(config.train.seed)
    try:
        model = build_model(config, hf_config).to(device)
    except Exception as err:  # a config transformers accepts but cannot build, unreadable weights, ...
        key = "model.path" if config.model.path is not None else "model.overrides"
        raise ConfigError(f"{key}: cannot build the model ({' '.join(str(err).split())})") from None
    model.train()
    train_model = distributed.wrap_model(  # FSDP2 shards `model` in place: optimizer after it
        model, info, reshard_after_forward=config.train.fsdp_reshard_after_forward,
        prefetch=config.train.fsdp_prefetch)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        if not weights_finite(model, info):  # e.g. written by a version that did not check before saving
            raise CheckpointError(f"checkpoint {resume_from} holds NaN or inf weights; resume from an earlier "
                                  "checkpoint (move this one out of checkpoints/)")
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    tokenizer, tokenizer_note = obtain_tokenizer(config, train_docs, vocab_size, run_dir=run_dir, resume=resume)
    data = build_datasets(train_docs, eval_docs, tokenizer, seq_len=config.data.seq_len, source=source,
                          token_cache=config.data.token_cache)
    sampler = SequenceSampler(len(data.train), seed=config.train.seed)
    if state is not None:
        sampler.load_state_dict(state["sampler"])

    first_batch = list(range(min(config.train.batch_size, len(data.train))))
    probe = maybe_probe(config, model, lambda: indexed_batch(data.train, first_batch), device,
                        distributed=info.enabled)  # dense vs token-sparse time on a model copy, CPU only
    context = RunContext(config, model, optimizer, scheduler, device, data=data, tokenizer=tokenizer,
                         say=print if info.is_main else _quiet, train_model=train_model, dist=info,
                         loss_fn=fused_dense_loss if config.model.liger else dense_loss)
    for plugin in default_plugins() if plugins is None else plugins:
        plugin(context)
    if resume_from is not None:
        ckpt.load_plugin_state(resume_from, context.plugin_state)
    return PreparedRun(
        config, run_dir, device, autocast_dtype_for(config.train.precision, device), context, data, sampler,
        tokenizer, tokenizer_note, start_step=int(state["step"]) if state else 0, state=state,
        resume_from=resume_from, notes=notes, dist=info, probe=probe,
    )  # fmt: skip


def run_training(config: Config, *, resume: bool = False, plugins: Sequence[Plugin] | None = None) -> RunResult:
    """Train as ``config`` says (see the module docstring). Raises ``TrainError`` subclasses on bad input."""
    started = time.perf_counter()
    run = prepare_run(config, resume=resume, plugins=plugins)
    return execute_run(run, started=started)


def execute_run(run: PreparedRun, *, started: float | None = None) -> RunResult:
    """The writing part of a run: run directory, evaluations, the step loop, checkpoints, the summary."""
    started = time.perf_counter() if started is None else started
    config, ctx, state, t = run.config, run.context, run.state, run.config.train
    main = run.dist.is_main  # under torchrun only rank 0 writes and prints
    tokenizer_dir = os.path.join(run.run_dir, TOKENIZER_DIR)
    if main:
        os.makedirs(run.run_dir, exist_ok=True)
        if run.resume_from is None:
            run.tokenizer.save(tokenizer_dir)
        with open(os.path.join(run.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_yaml(_resolved(config, run.run_dir)))
    resume_step = run.start_step if run.resume_from else None
    metrics = (MetricsLogger(run.run_dir, tensorboard=config.log.tensorboard, resume_step=resume_step) if main
               else _NoMetrics())
    progress = Progress(t.steps, run.start_step, enabled=config.log.progress and main, every=config.log.every)
    say = progress.write if main else _quiet
    train_model = ctx.train_model or ctx.model
    _print_header(say, run)

    eval_size = config.eval.batch_size or t.batch_size
    evals = eval_batches(run.data.eval, eval_size, config.eval.max_batches) if run.data.eval is not None else []
    clock = RunClock.from_state(state)  # tokens and step seconds so far, for plots by tokens / wall-clock
    first_eval = _eval_point(state.get("first_eval")) if state else None
    last_eval = _eval_point(state.get("last_eval")) if state else None

    def run_eval(step: int) -> EvalPoint | None:
        if not evals:
            return None
        loss, tokens = evaluate(ctx.model, evals, autocast_dtype=run.autocast_dtype)
        point = EvalPoint(step, loss, tokens)
        metrics.log(step, "eval", {"loss": loss, "perplexity": point.perplexity, **clock.record()})
        say(point.describe())
        return point

    sharded = config.checkpoint.format == "sharded" or (config.checkpoint.format == "auto"
                                                         and run.dist.strategy == "fsdp2")

    def save(step: int, *, last: bool = False) -> str:
        if not weights_finite(ctx.model, run.dist):
            where = f"the last good checkpoint is {saved_path}" if saved_path else "no checkpoint was saved"
            raise TrainingStoppedError(
                f"the weights hold NaN or inf after step {step} (loss and gradient norm were finite: the optimizer "
                f"step itself overflowed; lower train.lr or set train.max_grad_norm > 0); this step is not saved; "
                f"{where}"
            )
        extra = {
            "sampler": run.sampler.state_dict(),
            "config": _resolved(config, run.run_dir).to_dict(),
            "first_eval": _eval_dict(first_eval),
            "last_eval": _eval_dict(last_eval),
            "seconds": time.perf_counter() - started + (state or {}).get("seconds", 0.0),
            **clock.state_dict(),
        }
        return ckpt.save_checkpoint(
            run.run_dir, step=step, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
            extra=extra, tokenizer_dir=tokenizer_dir, keep=config.checkpoint.keep,
            plugin_state={name: obj.state_dict() for name, obj in ctx.plugin_state.items()}, sharded=sharded,
            full_weights=config.checkpoint.full_weights == "every" or last or step == t.steps,
        )  # fmt: skip

    step, saved_path = run.start_step, run.resume_from
    if step >= t.steps:
        say(f"nothing to do: the run is at step {step} and train.steps is {t.steps}")
    stop = StopRequest()
    stop_signal = None
    try:
        if state is None:
            first_eval = last_eval = run_eval(0)
        else:
            ckpt.restore_rng(state)  # last: after model init and everything else that draws random numbers
        with stop:
            window_tokens, window_time, step_time = 0, 0.0, None
            vote = SignalVote(run.dist)
            while step < t.steps and (stop_signal := vote.poll(stop.signum)) is None:
                tic = time.perf_counter()
                micro = [distributed.local_share(indexed_batch(run.data.train, run.sampler.take(t.batch_size)),
                                                 run.dist) for _ in range(t.grad_accum)]
                try:
                    stats = train_step(
                        train_model, micro, ctx.optimizer, ctx.scheduler, step=step + 1, loss_fn=ctx.loss_fn,
                        max_grad_norm=t.max_grad_norm, autocast_dtype=run.autocast_dtype, hooks=ctx.hooks,
                    )  # fmt: skip
                except NonFiniteLossError as err:
                    where = f"the last good checkpoint is {saved_path}" if saved_path else "no checkpoint was saved"
                    raise TrainingStoppedError(f"{err}. Training stopped; {where}") from None
                step += 1
                elapsed = time.perf_counter() - tic
                clock.add(stats.num_tokens, elapsed)
                step_time = elapsed if step_time is None else 0.8 * step_time + 0.2 * elapsed
                window_tokens, window_time = window_tokens + stats.num_tokens, window_time + elapsed
                progress.update(stats, stats.num_tokens / step_time)
                if step % config.log.every == 0 or step == t.steps:
                    metrics.log(step, "train", {**step_record(stats, window_tokens / window_time), **clock.record()})
                    window_tokens, window_time = 0, 0.0
                if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
                    last_eval = run_eval(step) or last_eval
                if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == t.steps:
                    saved_path = save(step)
            if stop_signal is None:  # a signal during the last step (every rank reaches this line)
                stop_signal = vote.final(stop.signum)
            if stop_signal is not None:
                saved_path = save(step, last=True)
                name = signal.Signals(stop_signal).name
                say(f"stopped by {name} after step {step}: checkpoint saved to {saved_path}; continue with --resume")
    finally:
        progress.close()
        metrics.close()

    if main and config.log.plot:
        _write_plot(say, run.run_dir)
    seconds = time.perf_counter() - started
    result = RunResult(run.run_dir, step, first_eval, last_eval, saved_path, stop_signal, seconds)
    if stop_signal is None:
        _print_summary(say, result)
    return result


def _write_plot(say: Callable[[str], None], run_dir: str) -> None:
    """``<run>/metrics.png`` (``centrifuge.train.plot``); a failure to draw is a note, not a failed run."""
    from centrifuge.train.plot import PLOT_FILE, plot_runs

    try:
        path = plot_runs([run_dir], os.path.join(run_dir, PLOT_FILE))
    except Exception as err:  # the run itself succeeded
        say(f"note: could not draw {PLOT_FILE}: {err}")
        return
    say(f"plot: {path} (compare runs: centrifuge plot RUN_A RUN_B; live: tensorboard --logdir {run_dir})")


# ------------------------------------------------------------------------------------------------ helpers


def weights_finite(model: nn.Module, info: distributed.Distributed) -> bool:
    """Whether every parameter is finite: one fused max-abs per tensor (``_foreach_norm``, inf-norm: NaN or
    inf in a tensor makes its value non-finite, and unlike the 2-norm it cannot overflow), one host read.

    Called only before a checkpoint is written, never per step: a step whose loss or gradient norm is
    non-finite already stops the run (``train_step`` reads both at its one host sync), and weights the
    optimizer made non-finite give a non-finite loss at the next step; so only the checkpoint written
    right after such a step could hold bad weights, and this check, at checkpoint steps only, costs the
    GPU step nothing. Under FSDP2 each rank checks its shards and the ranks agree (a collective: every
    rank calls this, as every rank calls ``save_checkpoint``)."""
    params = [p.detach() for p in model.parameters()]
    params = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    params = [p for p in params if p.numel()]
    device = params[0].device if params else torch.device("cpu")
    norms = [n.float() for n in torch._foreach_norm(params, math.inf)]  # .float(): bf16 and fp32 in one stack
    ok = torch.stack(norms).isfinite().all() if params else torch.tensor(True)
    flag = ok.to(device=_collective_device(info) if info.enabled else device, dtype=torch.int32)
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def start_distributed(config: Config) -> tuple[torch.device, distributed.Distributed]:
    """This rank's device and place in a ``torchrun`` job (one process: the configured device, no group).

    Checks first what every rank would refuse alike (``ConfigError``, nothing joined or written): a
    ``train.batch_size`` that does not split over the ranks, a ``train.device`` naming one GPU."""
    import torch.distributed as dist

    t = config.train
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else distributed.env_world_size()
    name = t.device
    if world > 1:
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} is the global micro-batch and must split evenly over "
                              f"the {world} ranks; use a multiple of {world}")
        try:
            name = distributed.rank_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    device = resolve_device(name)
    return device, distributed.init_distributed(t.distributed, device)


def _rank_zero_value(value: str, info: distributed.Distributed) -> str:
    """Rank 0's ``value`` on every rank (e.g. a ``{time}`` run directory resolved a second apart)."""
    if not info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SignalVote:
    """The ranks' agreement on a stop signal (SIGINT / SIGTERM reach ranks at different steps; all must stop
    after the same step, or the next step's collectives would wait forever), without a blocking collective
    or a host sync per step.

    Each ``poll`` launches this rank's vote (its signal number, 0 for none) as an asynchronous MAX all-reduce
    on a CPU (gloo) group of its own, and returns the outcome of the vote launched by the previous ``poll``,
    long finished by then: no CUDA stream is waited for, and the vote never queues behind the step's NCCL
    collectives. The price: a run stops one step later than with a vote read at once. ``final`` waits for
    the last vote and takes a blocking one (every rank calls it once, after the loop). One process: ``poll``
    returns the signal itself."""

    def __init__(self, info: distributed.Distributed) -> None:
        import torch.distributed as dist

        self.enabled = info.enabled
        self.group = dist.new_group(backend="gloo") if self.enabled else None  # collective: every rank, once
        self._pending: tuple[Any, torch.Tensor] | None = None

    def _launch(self, signum: int | None, *, wait: bool) -> int | None:
        import torch.distributed as dist

        vote = torch.tensor([signum or 0], dtype=torch.int64)
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=not wait)
        if wait:
            return int(vote.item()) or None
        self._pending = (work, vote)
        return None

    def _collect(self) -> int | None:
        if self._pending is None:
            return None
        work, vote = self._pending
        self._pending = None
        work.wait()
        return int(vote.item()) or None

    def poll(self, signum: int | None) -> int | None:
        """The signal agreed by the previous poll's vote (None at the first poll), after launching this one."""
        if not self.enabled:
            return signum
        agreed = self._collect()
        if agreed is None:
            self._launch(signum, wait=False)
        return agreed

    def final(self, signum: int | None) -> int | None:
        """The signal any rank has now (the outstanding vote included): a blocking vote."""
        if not self.enabled:
            return signum
        earlier = self._collect()
        now = self._launch(signum, wait=True)
        return earlier or now


def _collective_device(info: distributed.Distributed) -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _quiet(message: str) -> None:
    """``say`` on ranks other than 0."""


class _NoMetrics:
    """The metrics logger of ranks other than 0."""

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def indexed_batch(dataset: Any, indices: list[int]) -> dict[str, torch.Tensor]:
    """A training micro-batch plus ``sequence_index`` [B] (to look up precomputed per-sequence data)."""
    batch = dataset.batch(indices)
    batch["sequence_index"] = torch.tensor(indices, dtype=torch.long)
    return batch


def _resolved(config: Config, run_dir: str) -> Config:
    """The config as run: ``train.out_dir`` replaced by the actual directory."""
    raw = config.to_dict()
    raw["train"]["out_dir"] = run_dir
    return config_from_dict(raw)


def _eval_dict(point: EvalPoint | None) -> dict[str, Any] | None:
    return None if point is None else {"step": point.step, "loss": point.loss, "tokens": point.tokens}


def _eval_point(data: dict[str, Any] | None) -> EvalPoint | None:
    return None if not data else EvalPoint(int(data["step"]), float(data["loss"]), int(data["tokens"]))


def _print_header(say: Callable[[str], None], run: PreparedRun) -> None:
    config, model, t = run.config, run.context.model, run.config.train
    params = sum(p.numel() for p in model.parameters())
    what = f"model.path={config.model.path}" if config.model.path else f"preset {config.model.preset}"
    precision = "bf16 autocast" if run.autocast_dtype is not None else "fp32"
    say(f"run directory: {run.run_dir}" + (f" (resuming from {run.resume_from})" if run.resume_from else ""))
    for note in run.notes:
        say(f"  changed since the checkpoint: {note}")
    say(f"model: {what} ({model.config.model_type}, {params / 1e6:.2f}M parameters) on {run.device}, {precision}")
    code = f"ON: runs Python code from {config.model.path}" if config.model.trust_remote_code else "off"
    say(f"remote code: {code} (model.trust_remote_code; never taken from a run directory)")
    say(f"tokenizer: {run.tokenizer_note}")
    say("data: " + run.data.describe().replace("\n", "\n      "))
    say(
        f"train: {t.steps} steps x {t.grad_accum} x {t.batch_size} sequences x {config.data.seq_len} tokens, "
        f"AdamW lr {t.lr:g} (warm-up {t.warmup_steps}, cosine to {t.lr * t.min_lr_ratio:g})"
    )
    if run.dist.enabled:
        world = run.dist.world_size
        say(f"distributed: {world} ranks ({run.dist.strategy}), each takes {t.batch_size // world} of the "
            f"{t.batch_size} sequences of every micro-batch")
    say(setup_line(config, run.device, run.autocast_dtype))
    for line in speed_lines(config, run.device, params, run.probe):
        say(line)
    if (note := busy_cpu_note(run.device)) is not None:
        say(note)


def _print_summary(say: Callable[[str], None], result: RunResult) -> None:
    minutes, seconds = divmod(result.seconds, 60)
    say(f"done: {result.step} steps in {int(minutes)}m{seconds:04.1f}s; last checkpoint {result.checkpoint}")
    if result.first_eval is not None and result.last_eval is not None:
        say(f"first {result.first_eval.describe()}")
        say(f"last  {result.last_eval.describe()}")

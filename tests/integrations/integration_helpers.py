"""Tiny models, data and a reference step for the integration tests (imported by name; a module called
``conftest`` would clash with the other test folders' conftest files)."""

from __future__ import annotations

import types

import torch
from transformers import AutoConfig, TrainerCallback, TrainingArguments

from centrifuge.models.presets import build_model
from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.train.step import StepHooks, train_step

VOCAB = 128
T = 13  # odd on purpose


def tiny_config(model_type: str = "llama", **extra):
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", *, dtype=torch.float64, seed: int = 0, **extra):
    """A random-init tiny causal LM whose RMSNorms compute in the model's dtype (HF's upcast to float32 would
    make two orders of the same float64 sums differ by ~1e-7 instead of ~1e-15)."""
    model = build_model(tiny_config(model_type, **extra), dtype=dtype, seed=seed)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_in_dtype, module)
    return model


def _rms_norm_in_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class PackedRows(torch.utils.data.Dataset):
    """[T] rows of random tokens: some with a packed document boundary (position ids restart, the first
    target of the second document unlabelled), some with a prompt whose labels are -100."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(1, VOCAB, (T,), generator=gen)
            labels = ids.clone()
            positions = torch.arange(T)
            if i % 3 == 1:
                cut = int(torch.randint(4, T - 3, (1,), generator=gen))
                positions[cut:] = torch.arange(T - cut)
                labels[cut] = IGNORE_INDEX
            if i % 3 == 2:
                labels[: int(torch.randint(2, T // 2, (1,), generator=gen))] = IGNORE_INDEX
            self.rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """Plain SGD, constant lr, no clipping: the reference step can replay it exactly."""
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                  max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                  logging_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def sft_config(tmp_path, **extra):
    """TRL's ``SFTConfig`` with ``training_args``' optimizer and schedule (so ``train_step`` can replay it),
    plus ``extra`` (e.g. ``max_length``, ``packing``)."""
    from trl import SFTConfig

    base = training_args(tmp_path).to_dict()
    keys = ("output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "optim", "lr_scheduler_type", "max_grad_norm", "weight_decay", "report_to", "use_cpu", "save_strategy",
            "logging_strategy", "seed")
    return SFTConfig(**{k: base[k] for k in keys}, **extra)


class Recorder(TrainerCallback):
    """Per optimizer step: the micro-batches (tensors only), the grads before the optimizer step, and the
    parameters after it."""

    def __init__(self):
        self.batches: list[list[dict]] = []
        self.grads: list[dict] = []
        self.params: list[dict] = []
        self.handle = None  # the TokenFiltering handle, when set: its counts are recorded per step
        self.counts: list[tuple[int, int, list[int]]] = []  # (counted, labelled, kept per micro-batch)

    def wrap(self, trainer) -> None:
        inner = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator, num_batches, device):
            samples, num_items = inner(epoch_iterator, num_batches, device)
            self.batches.append([{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)}
                                 for b in samples])
            return samples, num_items

        trainer.get_batch_samples = get_batch_samples

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        if self.handle is not None:
            kept = [-1 if m is None else int(m.sum()) for m in self.handle.keep_masks]
            self.counts.append((self.handle.num_counted, self.handle.num_labelled, kept))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def replay(model, steps: list[list[dict]], loss_fn, *, lr: float, hooks: StepHooks | None = None,
           optimizer=None):
    """The library's own steps over the recorded micro-batches: grads before each step, params after."""
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = hooks or StepHooks()
    grads, params = [], []
    hooks.after_backward.append(
        lambda step: grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}))
    for i, batches in enumerate(steps):
        train_step(model, batches, optimizer, None, step=i + 1, loss_fn=loss_fn, max_grad_norm=None, hooks=hooks)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return grads, params


def max_rel_err(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    worst = 0.0
    for name, r in ref.items():
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (got[name] - r).abs().max().item() / scale)
    return worst


def word_tokenizer():
    """A word-level fast tokenizer over ``w0 … w{VOCAB - 5}`` and four specials, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def prompt_completion_data(n: int, seed: int = 0):
    """``n`` prompt / completion pairs of random words, of different lengths (a ``datasets.Dataset``)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=gen))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (k,), generator=gen))

    return Dataset.from_list([{"prompt": words(2, 7), "completion": " " + words(2, 6)} for _ in range(n)])

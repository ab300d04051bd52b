"""Profiles (model size, training length, corpus) and the study's arms (``centrifuge train`` overrides).

Every arm of a profile trains the same model from the same seed on the same data order (``train.seed`` seeds
model init and the sampler); arms differ only in their ``tokens`` / ``neurons`` sections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from experiments.utility.corpus import CorpusSettings


@dataclass(frozen=True)
class Profile:
    """One size of the study. ``model`` holds HF config fields applied to the ``tiny`` Llama preset."""

    name: str
    model: dict[str, Any]
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batch_size: int
    eval_max_batches: int  # 0 = the whole held-out split
    reference_steps: int
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    neuron_multiple: int = 64  # neurons.multiple (kept MLP channels rounded up to it)
    score_batch: int = 32  # sequences per reference-scoring forward

    def base_overrides(self, *, device: str) -> list[str]:
        """``--set`` overrides shared by the reference run and every arm (data path and out_dir come later)."""
        return [
            "model.preset=tiny",
            f"model.overrides={json.dumps(self.model)}",
            f"data.seq_len={self.seq_len}",
            "data.eval_fraction=0",  # the held-out split is the study's own clean eval.jsonl
            f"train.steps={self.steps}",
            f"train.batch_size={self.batch_size}",
            f"train.lr={self.lr}",
            f"train.warmup_steps={self.warmup_steps}",
            f"train.device={device}",
            f"eval.every={self.eval_every}",
            f"eval.batch_size={self.eval_batch_size}",
            f"eval.max_batches={self.eval_max_batches}",
            "checkpoint.every=0",
            "checkpoint.keep=1",
            "log.every=1",  # one metrics record per step: per-step wall-clock from the loop's own timing
            "log.progress=false",
            "log.tensorboard=false",
            "tokens.keep_ratio=1.0",
        ]


PROFILES: dict[str, Profile] = {
    # ~26M parameters (hidden 512, 6 layers, GQA 8/4 heads, vocabulary 8192), 300 steps of 16 x 512 tokens:
    # about 2.9 passes over the noisy mixture (1,678 rows of 512 tokens with Python 3.11's standard library);
    # the reference makes about 3.9 passes over the clean half. bf16 autocast on CUDA (train.precision=auto).
    "gpu": Profile(
        name="gpu",
        model={"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
               "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 1024},
        seq_len=512, batch_size=16, steps=300, lr=2e-3, warmup_steps=30,
        eval_every=20, eval_batch_size=32, eval_max_batches=0, reference_steps=200,
    ),  # fmt: skip
    # A CPU sanity run of the whole method (~1M parameters, 600 documents): about a minute per arm.
    "cpu-small": Profile(
        name="cpu-small",
        model={"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 256},
        seq_len=128, batch_size=16, steps=200, lr=3e-3, warmup_steps=20,
        eval_every=20, eval_batch_size=32, eval_max_batches=8, reference_steps=150,
        corpus=CorpusSettings(sources=("pydoc", "docstrings"), max_docs=600, doc_chars=1500),
        neuron_multiple=32,
    ),  # fmt: skip
    # A model of ~0.15M parameters on a 60-document pydoc corpus: seconds per arm on one CPU thread.
    "cpu-smoke": Profile(
        name="cpu-smoke",
        model={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128},
        seq_len=64, batch_size=4, steps=8, lr=3e-3, warmup_steps=2,
        eval_every=4, eval_batch_size=8, eval_max_batches=2, reference_steps=8,
        corpus=CorpusSettings(sources=("pydoc",), max_docs=60, doc_chars=1500),
        neuron_multiple=32, score_batch=16,
    ),  # fmt: skip
}


def _excess(ratio: float, mode: str) -> list[str]:
    return ["tokens.selector=excess_loss", f"tokens.keep_ratio={ratio}", "tokens.scope=batch", f"tokens.mode={mode}",
            "tokens.reference_scores={scores}"]  # fmt: skip


def _neurons_lors(profile: Profile) -> list[str]:
    """Neuron omission, LORS: rate 0.5 for half the run, then 4 rungs down to dense."""
    return ["neurons.rate=0.5", "neurons.schedule=ladder", "neurons.hold_fraction=0.5", "neurons.rungs=4",
            "neurons.end=0.0", "neurons.metric=activation", "neurons.select=sample", "neurons.mlp=true",
            "neurons.heads=true", f"neurons.multiple={profile.neuron_multiple}", "neurons.seed={seed}"]  # fmt: skip


def arm_overrides(arm: str, profile: Profile) -> list[str]:
    """The arm's overrides; ``{scores}`` and ``{seed}`` are filled in by the runner."""
    arms: dict[str, list[str]] = {
        "dense": ["tokens.keep_ratio=1.0"],
        "rho1_loss_only_k0.6": _excess(0.6, "loss_only"),
        "rho1_loss_only_k0.5": _excess(0.5, "loss_only"),
        "centrifuge_k0.6": _excess(0.6, "fast"),
        "centrifuge_k0.5": _excess(0.5, "fast"),
        "random_k0.5": ["tokens.selector=random", "tokens.keep_ratio=0.5", "tokens.scope=batch", "tokens.mode=fast",
                        "tokens.selector_params={{seed: {seed}}}"],
        "self_loss_k0.5": ["tokens.selector=self_loss", "tokens.keep_ratio=0.5", "tokens.scope=batch",
                           "tokens.mode=fast"],
        "neurons_lors": ["tokens.keep_ratio=1.0", *_neurons_lors(profile)],
        "tokens_neurons": [*_excess(0.5, "fast"), *_neurons_lors(profile)],
    }  # fmt: skip
    if arm not in arms:
        raise KeyError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    return arms[arm]


ARMS: tuple[str, ...] = (
    "dense",
    "rho1_loss_only_k0.6",
    "rho1_loss_only_k0.5",
    "centrifuge_k0.6",
    "centrifuge_k0.5",
    "random_k0.5",
    "self_loss_k0.5",
    "neurons_lors",
    "tokens_neurons",
)
NEEDS_SCORES = tuple(a for a in ARMS if a.startswith(("rho1", "centrifuge", "tokens_neurons")))

"""Profiles of the time-to-quality study and its arms (the utility study's arms, at equal wall-clock).

Every arm trains the same model from the same seed on the same data order with the same optimizer; what
differs is its ``tokens`` / ``neurons`` section (``experiments.utility.profiles.arm_overrides``) and its step
count: each arm gets ``budget_s`` seconds of training, so its step count is ``budget_s`` divided by its own
measured step time (``study.calibrate``), and the learning-rate schedule (warm-up, cosine) and the LORS
ladder are laid over that step count. See the README for why the budget is turned into steps up front
rather than stopping a run by the clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from experiments.time_to_quality.corpus import SourceCorpusSettings
from experiments.utility.profiles import Profile, _excess, arm_overrides


@dataclass(frozen=True)
class TimeProfile(Profile):
    """A utility ``Profile`` plus the time budget, the source corpus and the reference model's shape.

    ``steps`` / ``warmup_steps`` / ``eval_every`` of the base profile are only used by the reference run;
    an arm's come from its calibrated step count."""

    corpus: SourceCorpusSettings = field(default_factory=SourceCorpusSettings)  # type: ignore[assignment]
    budget_s: float = 60.0  # training wall-clock of every arm (evaluation excluded)
    calibration_steps: int = 12  # timed steps per calibration (the first ones are compile / warm-up)
    min_steps: int = 10  # clamps on an arm's step count (a CPU under load can be slow or fast)
    max_steps: int = 100_000
    warmup_fraction: float = 0.05
    eval_points: int = 16  # held-out evaluations per arm run (plus step 0)
    reference_model: dict[str, Any] | None = None  # HF config fields of the reference; None = as the arms
    tokenizer_max_chars: int = 50_000_000  # clean reference text the BPE is trained on (its seeded prefix)
    nextline_batch: int = 32  # next-line prompts per generate call
    nextline_new_tokens: int = 48
    nextline_context_tokens: int = 384
    arm_extra: tuple[str, ...] = ()  # overrides for every arm
    # Overrides for the dense arm only: the strongest dense path (the GPU profiles: Liger-Kernel's fused kernels,
    # `model.liger`, which the bench measured as the fastest dense step); its calibrated step time, hence its
    # step count, follows.
    dense_extra: tuple[str, ...] = ()

    def reference_overrides(self) -> list[str]:
        model = {**self.model, **(self.reference_model or {})}
        return [f"model.overrides={json.dumps(model)}", f"train.steps={self.reference_steps}"]


# Arms of issue 21 (``experiments.utility.profiles`` defines their overrides), plus LORS at dense's step count.
ARMS: tuple[str, ...] = (
    "dense",
    "centrifuge_k0.5",  # excess-loss selection, token-sparse backward
    "random_k0.5",  # random selection at the same keep ratio, token-sparse backward
    "rho1_loss_only_k0.5",  # excess-loss selection, loss-only masking (Rho-1 as published): dense backward
    "neurons_lors",  # SAT LORS
    "tokens_neurons",  # excess-loss tokens + LORS
    "neurons_lors_eqsteps",  # LORS with dense's step count (the "within 1% at equal steps" check)
)
# Recipes to try when excess-loss selection trails dense (issue 21, point 4: keep-ratio schedules that end
# dense, another κ, per-sequence top-k). Not part of "--arms all"; run them by name (--arms / --runs).
TOKEN_LADDER = {"hold_fraction": 0.5, "rungs": 4, "end": 1.0}  # κ held for half the run, 4 rungs up to dense
RECIPES: dict[str, list[str]] = {
    "centrifuge_k0.7": _excess(0.7, "fast"),
    "centrifuge_seq_k0.5": [*(o for o in _excess(0.5, "fast") if not o.startswith("tokens.scope=")),
                            "tokens.scope=sequence"],
    "centrifuge_k0.5_to_dense": [*_excess(0.5, "fast"), "tokens.schedule=ladder",
                                 "tokens.schedule_params={{" + ", ".join(f"{k}: {v}" for k, v in TOKEN_LADDER.items())
                                 + "}}"],  # {{ }}: the runner's str.format fills {scores} / {seed}
}  # fmt: skip
RUNNABLE: tuple[str, ...] = (*ARMS, *RECIPES)
HEADLINE = ("dense", "centrifuge_k0.5")  # the pair run with two seeds
EQUAL_STEPS = {"neurons_lors_eqsteps": ("neurons_lors", "dense")}  # arm -> (overrides of, steps of)


def ttq_arm_overrides(arm: str, profile: TimeProfile) -> list[str]:
    """The arm's ``tokens`` / ``neurons`` overrides (``{scores}`` / ``{seed}`` filled in by the runner)."""
    if arm in RECIPES:
        return [*RECIPES[arm], *profile.arm_extra]
    if arm not in ARMS:
        raise KeyError(f"unknown arm {arm!r}; arms: {', '.join(RUNNABLE)}")
    base = EQUAL_STEPS.get(arm, (arm, arm))[0]
    return [*arm_overrides(base, profile), *profile.arm_extra, *(profile.dense_extra if arm == "dense" else ())]


PROFILES: dict[str, TimeProfile] = {
    # ~174M parameters (hidden 1024, 12 layers, 16 heads / 8 KV, MLP 2816, vocabulary 16384) at 16 x 1024
    # tokens a step, bf16 autocast. Reference: ~22M parameters of the same family (its bf16 weights, ~44 MB,
    # travel between device calls; a reference of the arms' size would not), on the clean documents.
    # Corpus: 160 MB of installed Python text (~45M tokens: more than any arm reads in its budget, so no
    # arm repeats data). budget_s: see the README's device plan.
    "gpu": TimeProfile(
        name="gpu",
        model={"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
               "num_key_value_heads": 8, "vocab_size": 16384, "max_position_embeddings": 1024},
        reference_model={"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
                         "num_attention_heads": 6, "num_key_value_heads": 2},
        seq_len=1024, batch_size=16, steps=1, lr=1e-3, warmup_steps=40, eval_every=100, eval_batch_size=16,
        eval_max_batches=16, reference_steps=1500, score_batch=64, neuron_multiple=128,
        corpus=SourceCorpusSettings(max_mb=160, eval_max_chars=1_500_000, nextline_prompts=256),
        budget_s=80.0, calibration_steps=15, min_steps=50, eval_points=16, tokenizer_max_chars=40_000_000,
        dense_extra=("model.liger=true",),
    ),  # fmt: skip
    # Fallback if `gpu`'s token-sparse step is not below 0.7x dense (the report's shape condition): TinyLlama's
    # width (2048 / 5632, 32 heads / 4 KV), where the bench measured the token-sparse step at 0.53x of eager HF
    # dense, with 8 layers (~420M parameters); everything else as `gpu`.
    "gpu-wide": TimeProfile(
        name="gpu-wide",
        model={"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": 16384, "max_position_embeddings": 1024},
        reference_model={"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
                         "num_attention_heads": 6, "num_key_value_heads": 2},
        seq_len=1024, batch_size=16, steps=1, lr=6e-4, warmup_steps=40, eval_every=100, eval_batch_size=16,
        eval_max_batches=16, reference_steps=1500, score_batch=64, neuron_multiple=128,
        corpus=SourceCorpusSettings(max_mb=160, eval_max_chars=1_500_000, nextline_prompts=256),
        budget_s=80.0, calibration_steps=15, min_steps=30, eval_points=16, tokenizer_max_chars=40_000_000,
        dense_extra=("model.liger=true",),
    ),  # fmt: skip
    # The whole pipeline on a CPU in seconds (tests/experiments/test_ttq_pipeline.py): ~30k parameters,
    # 0.3 MB of standard-library files (held-out code for the next-line prompts, whatever the Python version);
    # step counts clamped to 6..10 so the test's run time is bounded.
    "cpu-toy": TimeProfile(
        name="cpu-toy",
        model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 320, "max_position_embeddings": 64},
        seq_len=64, batch_size=4, steps=1, lr=3e-3, warmup_steps=1, eval_every=3, eval_batch_size=8,
        eval_max_batches=2, reference_steps=6, score_batch=32, neuron_multiple=16,
        corpus=SourceCorpusSettings(max_mb=0.3, roots=("stdlib",), eval_fraction=0.1, eval_max_chars=20_000,
                                    nextline_prompts=6),
        budget_s=0.4, calibration_steps=3, min_steps=6, max_steps=10, eval_points=3, nextline_batch=8,
        nextline_new_tokens=8, nextline_context_tokens=48,
    ),  # fmt: skip
}

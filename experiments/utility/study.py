"""The study's steps, through Centrifuge's own Python API.

``prepare`` (once per output directory): corpus -> tokenizer (byte-level BPE on the clean reference text) ->
reference model trained on the clean text with ``centrifuge.train`` -> its per-token losses over the noisy
mixture with ``centrifuge score-reference``'s function. ``run_arm``: one ``centrifuge train`` run of an arm
and seed, evaluated on the clean held-out split, summarized into ``result.json``.

Layout of the output directory::

    prepared/   corpus/ (jsonl + manifest), tokenizer/, reference/ (its run), scores/, prepared.json
    runs/<arm>/seed<k>/   config.yaml, metrics.jsonl, result.json (or error.txt)
    invocations.jsonl     one line per command: argv, device, versions, time
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from centrifuge._io import atomic_write
from experiments.utility.corpus import read_texts, write_corpus
from experiments.utility.curves import read_records, run_numbers
from experiments.utility.profiles import Profile, arm_overrides

PREPARED = "prepared"
RUNS = "runs"
RESULT = "result.json"
ERROR = "error.txt"


def environment(device: str) -> dict[str, Any]:
    """Where the numbers come from: device name, library versions, the command line."""
    import transformers

    from centrifuge.train.loop import resolve_device

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    return {
        "device": name,
        "device_type": dev.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "argv": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _write_json(path: str, data: Any) -> None:
    atomic_write(path, lambda tmp: _dump(tmp, data))


def _dump(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ one training run


def train_config(profile: Profile, *, data: str, tokenizer: str, out_dir: str, device: str, extra: list[str]):
    """The ``centrifuge train`` config of one run (built-in defaults + profile + ``extra`` overrides)."""
    from centrifuge.train.config import load_config

    overrides = [*profile.base_overrides(device=device), f"data.path={data}", f"data.tokenizer={tokenizer}",
                 f"train.out_dir={out_dir}", *extra]  # fmt: skip
    return load_config(None, overrides)


def train_with_clean_eval(config, eval_path: str):
    """``prepare_run`` -> the clean held-out split as the run's eval data -> ``execute_run``.

    The loop evaluates ``run.data.eval`` at step 0, every ``eval.every`` steps and at the end, and logs it to
    ``metrics.jsonl``; the study only swaps in its own clean split, packed with the run's tokenizer."""
    from centrifuge.train.config import DataSection
    from centrifuge.train.data import pack_documents, read_documents, tokenize_documents
    from centrifuge.train.loop import execute_run, prepare_run

    started = time.perf_counter()
    run = prepare_run(config)
    docs, _ = read_documents(DataSection(path=eval_path))
    packed = pack_documents(tokenize_documents(docs, run.tokenizer), config.data.seq_len, pad_id=run.tokenizer.eos_id)
    run.data = dataclasses.replace(run.data, eval=packed, num_eval_docs=len(docs))
    result = execute_run(run, started=started)
    del run
    return result


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- prepare


def _scores_fingerprint(scores_dir: str) -> str:
    """A hash of the stored losses themselves (shard files also hold paths, which differ between copies)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    manifest = _read_json(os.path.join(scores_dir, "manifest.json"))
    for shard in manifest["shards"]:
        with safe_open(os.path.join(scores_dir, shard["file"]), framework="pt") as f:
            digest.update(f.get_tensor("loss").float().numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare(
    out: str, profile: Profile, *, device: str, copy_from: str | None = None, keep_checkpoints: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Corpus, tokenizer, reference model and reference scores in ``out/prepared`` (reused when complete).

    ``copy_from``: a ``prepared`` directory of an earlier invocation (e.g. carried to another machine) to copy
    instead of rebuilding, so every arm of a study uses the same corpus and the same reference scores."""
    from centrifuge.cli.score_cmd import score_reference
    from centrifuge.train.tokenizer import train_bpe

    root = os.path.join(out, PREPARED)
    marker = os.path.join(root, "prepared.json")
    if not os.path.isfile(marker) and copy_from is not None:
        if not os.path.isfile(os.path.join(copy_from, "prepared.json")):
            raise FileNotFoundError(f"--prepared {copy_from}: no prepared.json there (not a finished prepare)")
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(copy_from, root)
        say(f"prepared: copied from {copy_from}")
    if os.path.isfile(marker):
        info = _read_json(marker)
        if info["profile"] != profile.name:
            raise ValueError(f"{root} was prepared for profile {info['profile']!r}, not {profile.name!r}")
        say(f"prepared: reusing {root} (corpus {info['corpus_fingerprint']}, scores {info['scores_fingerprint']})")
        return info
    shutil.rmtree(root, ignore_errors=True)  # an unfinished earlier attempt
    os.makedirs(root)
    tic = time.perf_counter()
    corpus_dir = os.path.join(root, "corpus")
    manifest = write_corpus(corpus_dir, profile.corpus)
    files = manifest["files"]
    say(f"corpus: {files['train']['documents']} training documents ({files['train']['corrupted_documents']} "
        f"corrupted, {100 * files['train']['noise_char_fraction']:.0f}% noise characters), "
        f"{files['reference']['documents']} clean reference documents, {files['eval']['documents']} held out "
        f"({time.perf_counter() - tic:.1f} s); documents by source: {manifest['documents_by_source']}")  # fmt: skip

    tokenizer_dir = os.path.join(root, "tokenizer")
    tok = train_bpe(read_texts(os.path.join(corpus_dir, "reference.jsonl")), int(profile.model["vocab_size"]))
    tok.save(tokenizer_dir)

    eval_path = os.path.join(corpus_dir, "eval.jsonl")
    ref_dir = os.path.join(root, "reference")
    ref_config = train_config(
        profile, data=os.path.join(corpus_dir, "reference.jsonl"), tokenizer=tokenizer_dir, out_dir=ref_dir,
        device=device, extra=[f"train.steps={profile.reference_steps}"],
    )  # fmt: skip
    say(f"reference: training on the clean reference documents for {profile.reference_steps} steps")
    ref = train_with_clean_eval(ref_config, eval_path)
    ref_numbers = run_numbers(read_records(os.path.join(ref_dir, "metrics.jsonl")))
    _write_json(os.path.join(ref_dir, RESULT), {"arm": "reference", **ref_numbers})
    _free_memory()

    scores_dir = os.path.join(root, "scores")
    arm_config = train_config(profile, data=os.path.join(corpus_dir, "train.jsonl"), tokenizer=tokenizer_dir,
                              out_dir=os.path.join(root, "unused"), device=device, extra=[])  # fmt: skip
    tic = time.perf_counter()
    score_reference(arm_config, ref.checkpoint, scores_dir, batch_size=profile.score_batch, device=device,
                    progress=False, log=say)  # fmt: skip
    score_seconds = time.perf_counter() - tic
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(ref_dir, "checkpoints"), ignore_errors=True)
    _free_memory()
    info = {
        "profile": profile.name,
        "corpus_fingerprint": manifest["fingerprint"],
        "corpus": files,
        "python": manifest["python"],
        "scores_fingerprint": _scores_fingerprint(scores_dir),
        "reference_final_eval_loss": ref_numbers["final_eval_loss"],
        "reference_train_seconds": ref_numbers["train_seconds"],
        "score_seconds": score_seconds,
        "environment": environment(device),
    }
    _write_json(marker, info)
    return info


# --------------------------------------------------------------------------------------------------- arms


def run_dir_of(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, RUNS, arm, f"seed{seed}")


def run_arm(
    out: str, profile: Profile, arm: str, seed: int, *, device: str, prepared: dict[str, Any],
    force: bool = False, keep_checkpoints: bool = False, say: Callable[[str], None] = print,
    overrides: list[str] | None = None, measure: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Train ``arm`` with ``seed`` into ``out/runs/<arm>/seed<seed>``; returns its result (None on failure).

    A finished run (``result.json`` present) is kept unless ``force``; an unfinished one is started over.
    A failure is written to ``error.txt`` and reported, and the study goes on with the next run.
    ``overrides``: the arm's overrides (default ``arm_overrides(arm, profile)``; ``{scores}`` / ``{seed}``
    filled in); ``measure(run_dir)``: more numbers for ``result.json``, taken before checkpoints are removed."""
    run_dir = run_dir_of(out, arm, seed)
    result_path = os.path.join(run_dir, RESULT)
    if os.path.isfile(result_path) and not force:
        say(f"{arm} seed {seed}: done before, kept ({result_path})")
        return _read_json(result_path)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    root = os.path.join(out, PREPARED)
    scores = os.path.join(root, "scores")
    arm_sets = arm_overrides(arm, profile) if overrides is None else overrides
    extra = [o.format(scores=scores, seed=seed) for o in arm_sets]
    extra.append(f"train.seed={seed}")
    say(f"=== {arm} seed {seed}: {' '.join(e for e in extra if not e.startswith('tokens.reference_scores'))}")
    tic = time.perf_counter()
    try:
        config = train_config(profile, data=os.path.join(root, "corpus", "train.jsonl"),
                              tokenizer=os.path.join(root, "tokenizer"), out_dir=run_dir, device=device, extra=extra)
        train_with_clean_eval(config, os.path.join(root, "corpus", "eval.jsonl"))
        numbers = run_numbers(read_records(os.path.join(run_dir, "metrics.jsonl")))
        if measure is not None:
            numbers.update(measure(run_dir))
    except Exception as err:  # one failed arm must not stop the study
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ERROR), "w", encoding="utf-8") as f:
            f.write(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        say(f"{arm} seed {seed}: FAILED: {type(err).__name__}: {err}")
        _free_memory()
        return None
    finally:
        if not keep_checkpoints:
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "tokenizer"), ignore_errors=True)  # a copy of prepared/tokenizer
    result = {
        "arm": arm,
        "seed": seed,
        "profile": profile.name,
        "overrides": extra,
        "corpus_fingerprint": prepared["corpus_fingerprint"],
        "scores_fingerprint": prepared["scores_fingerprint"],
        "environment": environment(device),
        "wall_seconds": time.perf_counter() - tic,
        **numbers,
    }
    _write_json(result_path, result)
    _free_memory()
    return result

"""The time-to-quality study's steps; training, scoring and evaluation go through ``experiments.utility``.

``prepare``: source corpus -> tokenizer (byte-level BPE on the clean reference text) -> tokenize-once cache
(``data.token_cache``) -> reference model on the clean documents (or one carried in from an earlier call,
``reference_from``) -> its per-token losses over the training mixture with ``centrifuge score-reference``'s
function. ``calibrate``: an arm's step time from a short timed run. ``arm_steps``: the step count that
fills the time budget. ``run_arm``: ``experiments.utility.study.run_arm`` with that step count, the
warm-up and evaluation spacing that follow from it, and the next-line exact match of the final model.

Layout of the output directory (the utility study's, plus two folders)::

    prepared/   corpus/ (jsonl + manifest), tokenizer/, token_cache/, reference/ (its run and model/),
                scores/, prepared.json
    calibration/<arm>.json   measured step times and the resulting step count
    runs/<arm>/seed<k>/      config.yaml, metrics.jsonl, result.json (or error.txt)
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import statistics
import tarfile
import time
from collections.abc import Callable
from typing import Any

import torch

from experiments.time_to_quality.corpus import write as write_corpus
from experiments.time_to_quality.profiles import EQUAL_STEPS, TOKEN_LADDER, TimeProfile, ttq_arm_overrides
from experiments.utility import study as utility
from experiments.utility.corpus import read_texts
from experiments.utility.curves import read_records, run_numbers

PREPARED, CALIBRATION, REFERENCE_MODEL = "prepared", "calibration", "model"
LADDER = {"start": 0.5, "hold_fraction": 0.5, "rungs": 4, "end": 0.0}  # as experiments.utility's _neurons_lors


def _paths(out: str) -> dict[str, str]:
    root = os.path.join(out, PREPARED)
    return {"root": root, "corpus": os.path.join(root, "corpus"), "tokenizer": os.path.join(root, "tokenizer"),
            "cache": os.path.join(root, "token_cache"), "reference": os.path.join(root, "reference"),
            "scores": os.path.join(root, "scores"), "marker": os.path.join(root, "prepared.json")}  # fmt: skip


def _config(profile: TimeProfile, out: str, *, data: str, out_dir: str, device: str, extra: list[str]):
    p = _paths(out)
    return utility.train_config(profile, data=data, tokenizer=p["tokenizer"], out_dir=out_dir, device=device,
                                extra=[f"data.token_cache={p['cache']}", *extra])  # fmt: skip


# ----------------------------------------------------------------------------------------------- prepare


def prepare(
    out: str, profile: TimeProfile, *, device: str, reference_from: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Corpus, tokenizer, token cache, reference model and scores in ``out/prepared`` (reused when complete).

    ``reference_from``: a directory holding ``export_reference``'s parts (or what they unpack to): its
    tokenizer and reference model are used instead of training new ones, so every device call of a study
    scores with the same reference."""
    from centrifuge.cli.score_cmd import score_reference
    from centrifuge.train.tokenizer import load_tokenizer, train_bpe

    p = _paths(out)
    if os.path.isfile(p["marker"]):
        info = utility._read_json(p["marker"])
        if info["profile"] != profile.name:
            raise ValueError(f"{p['root']} was prepared for profile {info['profile']!r}, not {profile.name!r}")
        say(f"prepared: reusing {p['root']} (corpus {info['corpus_fingerprint']}, scores {info['scores_fingerprint']})")
        return info
    shutil.rmtree(p["root"], ignore_errors=True)  # an unfinished earlier attempt
    os.makedirs(p["root"])
    times: dict[str, float] = {}
    tic = time.perf_counter()
    manifest = write_corpus(p["corpus"], profile.corpus)
    times["corpus_s"] = time.perf_counter() - tic
    files = manifest["files"]
    say(f"corpus: {files['train']['documents']} training documents ({files['train']['chars'] / 1e6:.1f} M chars, "
        f"{100 * files['train']['noise_char_fraction']:.1f}% labelled noise), {files['reference']['documents']} "
        f"clean reference documents, {files['eval']['documents']} held out ({times['corpus_s']:.1f} s)")

    tic = time.perf_counter()
    carried = unpack_reference(reference_from, os.path.join(p["root"], "carried")) if reference_from else None
    if carried:
        shutil.copytree(os.path.join(carried, "tokenizer"), p["tokenizer"])
        say(f"tokenizer and reference model: carried in from {reference_from}")
    else:
        texts, chars = [], 0
        for text in read_texts(os.path.join(p["corpus"], "reference.jsonl")):
            if chars >= profile.tokenizer_max_chars:
                break
            texts.append(text)
            chars += len(text)
        train_bpe(texts, int(profile.model["vocab_size"])).save(p["tokenizer"])
    times["tokenizer_s"] = time.perf_counter() - tic
    load_tokenizer(p["tokenizer"])  # fails here, not in every arm, if the carried one is unusable

    eval_path = os.path.join(p["corpus"], "eval.jsonl")
    ref_model = os.path.join(p["reference"], REFERENCE_MODEL)
    tic = time.perf_counter()
    if carried:
        shutil.copytree(os.path.join(carried, REFERENCE_MODEL), ref_model)
        ref_numbers = utility._read_json(os.path.join(carried, "reference.json"))
    else:
        ref_config = _config(profile, out, data=os.path.join(p["corpus"], "reference.jsonl"),
                             out_dir=p["reference"], device=device, extra=profile.reference_overrides())  # fmt: skip
        say(f"reference: training on the clean documents for {profile.reference_steps} steps")
        result = utility.train_with_clean_eval(ref_config, eval_path)
        ref_numbers = run_numbers(read_records(os.path.join(p["reference"], "metrics.jsonl")))
        _save_reference_model(result.checkpoint, ref_model)
        shutil.rmtree(os.path.join(p["reference"], "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(p["reference"], "tokenizer"), ignore_errors=True)
        ref_numbers = {"final_eval_loss": ref_numbers["final_eval_loss"], "train_seconds": ref_numbers["train_seconds"],
                       "steps": ref_numbers["steps"], "curve": ref_numbers["curve"]}  # fmt: skip
        utility._write_json(os.path.join(p["reference"], "reference.json"), ref_numbers)
    times["reference_s"] = time.perf_counter() - tic
    utility._free_memory()

    arm_config = _config(profile, out, data=os.path.join(p["corpus"], "train.jsonl"),
                         out_dir=os.path.join(p["root"], "unused"), device=device, extra=[])  # fmt: skip
    tic = time.perf_counter()
    scores = score_reference(arm_config, ref_model, p["scores"], batch_size=profile.score_batch, device=device,
                             store="float16", progress=False, log=say)  # fmt: skip
    times["scores_s"] = time.perf_counter() - tic  # tokenizing the mixture into the cache included
    utility._free_memory()
    info = {
        "profile": profile.name,
        "corpus_fingerprint": manifest["fingerprint"],
        "corpus": files,
        "held_out_files": len(manifest["held_out_files"]),
        "python": manifest["python"],
        "train_rows": scores["num_sequences"],
        "train_tokens": scores["num_sequences"] * profile.seq_len,
        "scores_fingerprint": utility._scores_fingerprint(p["scores"]),
        "reference_carried_from": reference_from,
        "reference_final_eval_loss": ref_numbers["final_eval_loss"],
        "reference_train_seconds": ref_numbers["train_seconds"],
        "seconds": times,
        "environment": utility.environment(device),
    }
    utility._write_json(p["marker"], info)
    return info


def _save_reference_model(checkpoint: str, dest: str) -> None:
    """The reference's weights as a bf16 model directory (what ``export_reference`` carries)."""
    from centrifuge.models.presets import load_model

    model = load_model(checkpoint, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)


PART_BYTES = 15 * 2**20  # parts of at most 15 MiB: the device machine returns files of up to 16 MiB


def export_reference(out: str, dest: str) -> list[str]:
    """Tokenizer + reference model + its numbers as ``reference.tar.part-NN`` files of at most 15 MiB in
    ``dest`` (to carry into the next device call with ``--reference-from``). Returns the part paths."""
    p = _paths(out)
    os.makedirs(dest, exist_ok=True)
    tar_path = os.path.join(dest, "reference.tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(p["tokenizer"], arcname="tokenizer")
        tar.add(os.path.join(p["reference"], REFERENCE_MODEL), arcname=REFERENCE_MODEL)
        tar.add(os.path.join(p["reference"], "reference.json"), arcname="reference.json")
    parts = []
    with open(tar_path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            part = f"{tar_path}.part-{i:02d}"
            with open(part, "wb") as g:
                g.write(block)
            parts.append(part)
    os.unlink(tar_path)
    return parts


def unpack_reference(source: str, dest: str) -> str:
    """A directory with ``tokenizer/``, ``model/`` and ``reference.json`` from ``source``: such a directory
    itself, or one holding ``reference.tar.part-NN`` files (joined in order; only regular files and
    directories are unpacked, with no absolute or parent paths)."""
    if os.path.isdir(os.path.join(source, REFERENCE_MODEL)):
        return source
    parts = sorted(glob.glob(os.path.join(source, "reference.tar.part-*")))
    if not parts:
        raise FileNotFoundError(f"--reference-from {source}: no reference.tar.part-NN files and no model/ there")
    os.makedirs(dest, exist_ok=True)
    tar_path = os.path.join(dest, "reference.tar")
    with open(tar_path, "wb") as f:
        for part in parts:
            with open(part, "rb") as g:
                shutil.copyfileobj(g, f)
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir()) or m.name.startswith(("/", "..")) or ".." in m.name.split("/"):
                raise ValueError(f"{source}: unexpected tar entry {m.name!r}")
        tar.extractall(dest, members=members, filter="data")  # "data": no links, devices or paths outside dest
    os.unlink(tar_path)
    return dest


# --------------------------------------------------------------------------------------------- calibrate


def time_steps(config, steps: int) -> dict[str, Any]:
    """Median and all per-step times of ``steps`` optimizer steps of ``config``'s run (nothing written).

    The steps are the loop's own (``prepare_run``'s model, optimizer, plug-ins and data; ``train_step``);
    ``train_step`` reads the loss back, so CUDA work is inside each time. The first step (compilation,
    autotuning) is left out of the median."""
    from centrifuge.models.liger import modeling_names_restored
    from centrifuge.train.loop import indexed_batch, prepare_run
    from centrifuge.train.step import train_step

    with modeling_names_restored():  # a dense arm's Liger patch (model.liger) must not reach the next model
        run = prepare_run(config)
        ctx, t = run.context, config.train
        seconds = []
        for step in range(1, steps + 1):
            tic = time.perf_counter()
            batch = indexed_batch(run.data.train, run.sampler.take(t.batch_size))
            train_step(ctx.train_model or ctx.model, [batch], ctx.optimizer, ctx.scheduler, step=step,
                       loss_fn=ctx.loss_fn, max_grad_norm=t.max_grad_norm, autocast_dtype=run.autocast_dtype,
                       hooks=ctx.hooks)  # fmt: skip
            seconds.append(time.perf_counter() - tic)
        del run
    utility._free_memory()
    return {"median_s": statistics.median(seconds[1:] or seconds), "seconds": seconds}


def _token_ladder_mean(start: float) -> float:
    """Mean keep ratio of ``profiles.TOKEN_LADDER`` from ``start`` (κ held, then rungs up to 1)."""
    from centrifuge.schedules import average, make_schedule

    return average(make_schedule("ladder", start=start, **TOKEN_LADDER), 1000)


def _ladder_mean_rate() -> float:
    from centrifuge.schedules import average, make_schedule

    return average(make_schedule("ladder", **LADDER), 1000)


def calibrate(
    out: str, profile: TimeProfile, arm: str, *, device: str, force: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """The arm's mean step time and its step count for ``profile.budget_s`` (``calibration/<arm>.json``,
    reused when it was measured on the same device).

    Token arms have one step time (constant keep ratio). A LORS arm's step time changes along its ladder,
    so it is timed at the ladder's start rate (constant) and without omission, and its mean over the run is
    interpolated linearly in the omission rate (GEMM work is linear in the kept fraction): t = t0 + (t_start
    - t0) * mean_rate / start_rate. An ``EQUAL_STEPS`` arm takes another arm's step count."""
    path = os.path.join(out, CALIBRATION, f"{arm}.json")
    device_name = utility.environment(device)["device"]
    if os.path.isfile(path) and not force:
        cal = utility._read_json(path)
        if cal["device"] == device_name and cal["budget_s"] == profile.budget_s:
            return cal
    if arm in EQUAL_STEPS:
        source = calibrate(out, profile, EQUAL_STEPS[arm][1], device=device, say=say)
        cal = {**source, "arm": arm, "steps_of": EQUAL_STEPS[arm][1]}
        utility._write_json(path, cal)
        return cal
    p = _paths(out)
    sets = ttq_arm_overrides(arm, profile)
    lors = any(s.startswith("neurons.schedule=ladder") for s in sets)
    token_ladder = any(s.startswith("tokens.schedule=ladder") for s in sets)
    probes = {"arm": [*sets, "neurons.schedule=constant"] if lors else sets}
    if lors:
        probes["no_omission"] = [s for s in sets if not s.startswith("neurons.")]
    if token_ladder:  # timed at its start κ (constant) and at κ = 1 (dense), interpolated in κ below
        base = [s for s in sets if not s.startswith(("tokens.schedule=", "tokens.schedule_params="))]
        probes["arm"] = base
        probes["dense_tokens"] = [s for s in base if not s.startswith("tokens.keep_ratio=")] + ["tokens.keep_ratio=1.0"]
    measured = {}
    for name, probe in probes.items():
        extra = [o.format(scores=p["scores"], seed=0) for o in probe]
        config = _config(profile, out, data=os.path.join(p["corpus"], "train.jsonl"),
                         out_dir=os.path.join(out, CALIBRATION, "unused"), device=device,
                         extra=[*extra, "train.steps=1000000", "eval.every=0"])  # fmt: skip
        measured[name] = time_steps(config, profile.calibration_steps)
    step_s = measured["arm"]["median_s"]
    if lors:
        t0, mean_rate = measured["no_omission"]["median_s"], _ladder_mean_rate()
        step_s = t0 + (step_s - t0) * mean_rate / LADDER["start"]
    mean_keep = None
    if token_ladder:  # step time linear in κ between the start κ and dense: t = t_k + (t_1 - t_k)(κ̄ - k)/(1 - k)
        start = next(float(s.split("=", 1)[1]) for s in sets if s.startswith("tokens.keep_ratio="))
        mean_keep = _token_ladder_mean(start)
        t1 = measured["dense_tokens"]["median_s"]
        step_s = step_s + (t1 - step_s) * (mean_keep - start) / (1.0 - start)
    steps = int(min(profile.max_steps, max(profile.min_steps, math.floor(profile.budget_s / step_s))))
    cal = {"arm": arm, "device": device_name, "budget_s": profile.budget_s, "step_s": step_s, "steps": steps,
           "probes": measured, "ladder_mean_rate": _ladder_mean_rate() if lors else None,
           "mean_keep_ratio": mean_keep}  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    utility._write_json(path, cal)
    say(f"calibration {arm}: {1000 * step_s:.1f} ms a step -> {steps} steps for {profile.budget_s:g} s")
    return cal


def schedule_overrides(profile: TimeProfile, steps: int) -> list[str]:
    """Step count, warm-up and evaluation spacing of an arm of ``steps`` steps."""
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, round(profile.warmup_fraction * steps))}",
            f"eval.every={max(1, steps // profile.eval_points)}"]  # fmt: skip


# --------------------------------------------------------------------------------------- next-line metric


def nextline_exact_match(model_dir: str, tokenizer_dir: str, prompts_path: str, profile: TimeProfile,
                         *, device: str) -> dict[str, Any]:  # fmt: skip
    """Greedy next-line exact match on held-out code: the model continues ``context`` (which stops before
    the newline that ends the line preceding ``target``); a hit is a continuation that starts with that
    newline followed by exactly ``target`` (trailing spaces ignored) and then a newline or the end."""
    from centrifuge.models.presets import load_model
    from centrifuge.train.loop import resolve_device
    from centrifuge.train.tokenizer import load_tokenizer

    dev = resolve_device(device)
    tok = load_tokenizer(tokenizer_dir)
    model = load_model(model_dir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).to(dev).eval()
    with open(prompts_path, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    hits = 0
    for start in range(0, len(prompts), profile.nextline_batch):
        group = prompts[start : start + profile.nextline_batch]
        contexts = [pr["context"][:-1] if pr["context"].endswith("\n") else pr["context"] for pr in group]
        encoded = [ids[-profile.nextline_context_tokens :] or [tok.eos_id] for ids in tok.encode_batch(contexts)]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[tok.eos_id] * (width - len(e)) + e for e in encoded], device=dev)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=dev)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=profile.nextline_new_tokens, pad_token_id=tok.eos_id,
                                       eos_token_id=None)  # fmt: skip
        for pr, row in zip(group, generated[:, width:].tolist(), strict=True):
            text = tok.decode(row)
            line = text[1:].split("\n", 1)[0] if text.startswith("\n") else None
            hits += line is not None and line.rstrip() == pr["target"].rstrip()
    del model
    utility._free_memory()
    return {"nextline_exact_match": hits / max(len(prompts), 1), "nextline_prompts": len(prompts)}


# --------------------------------------------------------------------------------------------------- arms


def run_arm(
    out: str, profile: TimeProfile, arm: str, seed: int, *, device: str, prepared: dict[str, Any],
    force: bool = False, say: Callable[[str], None] = print,
) -> dict[str, Any] | None:  # fmt: skip
    """Calibrate ``arm`` (or reuse its calibration), then train it for the budget's step count into
    ``out/runs/<arm>/seed<seed>`` with ``experiments.utility.study.run_arm``; adds the step count, the
    budget and the next-line exact match to ``result.json``. Returns the result (None on failure)."""
    if os.path.isfile(os.path.join(utility.run_dir_of(out, arm, seed), utility.RESULT)) and not force:
        return utility.run_arm(out, profile, arm, seed, device=device, prepared=prepared, say=say)
    cal = calibrate(out, profile, arm, device=device, say=say)  # time_steps restores the modeling names itself
    p = _paths(out)
    overrides = [*ttq_arm_overrides(arm, profile), *schedule_overrides(profile, cal["steps"]),
                 f"data.token_cache={p['cache']}"]  # fmt: skip

    def measure(run_dir: str) -> dict[str, Any]:
        from centrifuge.train.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}: no final checkpoint to evaluate next-line exact match on")
        numbers = nextline_exact_match(checkpoint, p["tokenizer"], os.path.join(p["corpus"], "nextline.jsonl"),
                                       profile, device=device)  # fmt: skip
        tokens_per_step = profile.batch_size * profile.seq_len
        return {**numbers, "budget_s": profile.budget_s, "calibrated_step_s": cal["step_s"],
                "tokens_per_step": tokens_per_step}  # fmt: skip

    from centrifuge.models.liger import modeling_names_restored

    with modeling_names_restored():  # the dense arm's Liger patch (model.liger) must not reach the next arm
        return utility.run_arm(out, profile, arm, seed, device=device, prepared=prepared, force=force, say=say,
                               overrides=overrides, measure=measure)  # fmt: skip

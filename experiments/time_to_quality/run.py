"""The time-to-quality study from one command (one device call runs one or a few arms of it).

    PYTHONPATH=src:. python -m experiments.time_to_quality.run --profile gpu --out DIR --arms dense --seeds 0

prepares ``DIR/prepared`` once (source corpus, tokenizer, token cache, reference model, its scores; the
tokenizer and reference come from ``--reference-from`` when given), calibrates and trains each requested
arm x seed into ``DIR/runs/<arm>/seed<k>`` (finished runs are kept), writes the report of everything in DIR
(``experiments.time_to_quality.report``), and with ``--pack FILE`` one ``.tar.gz`` of the results (no model
weights, no data) to bring back from a device call. Exit status: 0 all requested runs done, 1 some failed or
were left out by ``--call-budget-s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tarfile
import time

from experiments.time_to_quality.profiles import ARMS, HEADLINE, PROFILES, RECIPES, RUNNABLE
from experiments.utility.run import _list


def _runs(value: str) -> list[tuple[str, int]]:
    out = []
    for item in _list(value):
        arm, _, seed = item.partition(":")
        if arm not in RUNNABLE or not seed.isdigit():
            raise argparse.ArgumentTypeError(f"--runs wants ARM:SEED items with ARM one of {', '.join(RUNNABLE)}")
        out.append((arm, int(seed)))
    return out


def _arms(value: str) -> list[str]:
    """"all" = the issue's arms; the recipes (``profiles.RECIPES``) only by name."""
    return list(ARMS) if value.strip() == "all" else _list(value, RUNNABLE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.time_to_quality.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-toy")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (created; reused when it exists)")
    p.add_argument("--arms", type=_arms, default=[],
                   help=f"comma-separated subset of: {', '.join(ARMS)}, or all (default: none, prepare only); "
                        f"recipes to try, by name: {', '.join(RECIPES)}")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in _list(v)], default=None,
                   help=f"comma-separated seeds (default: 0,1 for {' and '.join(HEADLINE)}, 0 for the others)")
    p.add_argument("--runs", type=_runs, default=[], metavar="ARM:SEED,...",
                   help="explicit runs, e.g. dense:1,centrifuge_k0.5:1,random_k0.5:0 (after those of --arms)")
    p.add_argument("--calibrate", type=_arms, default=[], metavar="ARMS",
                   help="calibrate these arms first (step time, step count; no training) and print their step "
                        "time against dense's: the shape condition known before the arms are run")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per arm (default: the profile's)")
    p.add_argument("--dense-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override for the dense arm only (repeatable): the strongest dense path's switches")
    p.add_argument("--reference-from", default=None, metavar="DIR",
                   help="tokenizer + reference model exported by an earlier call (reference.tar.part-NN files); "
                        "calibration/*.json there (earlier calls' step counts) are used for arms not calibrated here")
    p.add_argument("--export-reference", default=None, metavar="DIR",
                   help="write the tokenizer + reference model as reference.tar.part-NN files (<= 15 MiB) here")
    p.add_argument("--pack", default=None, metavar="FILE", help="write the results (no weights, no data) as .tar.gz")
    p.add_argument("--call-budget-s", type=float, default=0.0, metavar="SECONDS",
                   help="start no run that would likely end past this many seconds after the start; 0 = none")
    p.add_argument("--force", action="store_true", help="train runs again even when they finished before")
    return p.parse_args(argv)


def pack(out: str, path: str) -> str:
    """The study's results (runs' numbers and configs, calibrations, manifests, report) as one .tar.gz."""
    patterns = ["runs/*/seed*/result.json", "runs/*/seed*/metrics.jsonl", "runs/*/seed*/config.yaml",
                "runs/*/seed*/error.txt", "calibration/*.json", "prepared/prepared.json",
                "prepared/corpus/manifest.json", "prepared/reference/reference.json", "prepared/scores/manifest.json",
                "invocations.jsonl", "report/*"]  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for pattern in patterns:
            for name in sorted(glob.glob(os.path.join(out, pattern))):
                tar.add(name, arcname=os.path.relpath(name, out))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # after argument parsing: --help stays fast

    from experiments.time_to_quality import study
    from experiments.time_to_quality.report import markdown_table, write_report
    from experiments.utility.study import environment

    profile = PROFILES[args.profile]
    if args.budget_s is not None:
        profile = dataclasses.replace(profile, budget_s=args.budget_s)
    if args.dense_set:
        profile = dataclasses.replace(profile, dense_extra=(*profile.dense_extra, *args.dense_set))
    os.makedirs(args.out, exist_ok=True)
    env = environment(args.device)
    env["argv"] = "python -m experiments.time_to_quality.run " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out, "invocations.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({**env, "profile": profile.name, "arms": args.arms, "seeds": args.seeds}) + "\n")
    print(f"time-to-quality study: profile {profile.name}, budget {profile.budget_s:g} s per arm, arms "
          f"{', '.join(args.arms) or '(none)'}, {env['device']}, torch {env['torch']}", flush=True)  # fmt: skip
    started = time.perf_counter()
    prepared = study.prepare(args.out, profile, device=args.device, reference_from=args.reference_from)
    print(f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    carried = os.path.join(args.reference_from or "", "calibration")
    if args.reference_from and os.path.isdir(carried):  # earlier calls' step counts: every seed of an arm alike
        os.makedirs(os.path.join(args.out, "calibration"), exist_ok=True)
        for path in sorted(glob.glob(os.path.join(carried, "*.json"))):
            target = os.path.join(args.out, "calibration", os.path.basename(path))
            if not os.path.exists(target):
                shutil.copyfile(path, target)
    if args.export_reference:
        parts = study.export_reference(args.out, args.export_reference)
        print(f"reference exported: {', '.join(parts)}", flush=True)
    if args.calibrate:
        times = {arm: study.calibrate(args.out, profile, arm, device=args.device)["step_s"]
                 for arm in dict.fromkeys(["dense", *args.calibrate])}  # fmt: skip
        for arm, step_s in times.items():
            print(f"calibrated {arm}: {1000 * step_s:.1f} ms a step = {step_s / times['dense']:.3f}x dense", flush=True)
    failed, skipped, longest = [], [], 0.0
    default_seeds = {arm: [0, 1] if arm in HEADLINE else [0] for arm in RUNNABLE}
    todo = [(arm, seed) for arm in args.arms for seed in (args.seeds if args.seeds is not None else default_seeds[arm])]
    for arm, seed in todo + [r for r in args.runs if r not in todo]:
        expected = 1.2 * longest if longest else 1.5 * profile.budget_s + 30  # before any run: the budget's share
        if args.call_budget_s and time.perf_counter() - started + expected > args.call_budget_s:
            skipped.append(f"{arm}/seed{seed}")
            continue
        tic = time.perf_counter()
        result = study.run_arm(args.out, profile, arm, seed, device=args.device, prepared=prepared,
                               force=args.force)  # fmt: skip
        longest = max(longest, time.perf_counter() - tic)
        if result is None:
            failed.append(f"{arm}/seed{seed}")
        else:
            print(f"--- {arm} seed {seed}: {result['steps']} steps, final held-out loss "
                  f"{result['final_eval_loss']:.4f}, {result['train_seconds']:.1f} s training, "
                  f"{result['wall_seconds']:.1f} s in all", flush=True)  # fmt: skip
    print(f"invocation done in {time.perf_counter() - started:.1f} s (torch threads {torch.get_num_threads()})")
    if glob.glob(os.path.join(args.out, "runs", "*", "seed*", "result.json")):
        payload = write_report([args.out])
        print(markdown_table(payload["table"]))
        print("\n".join(f"- {c['goal']}: {c['text']}" for c in payload["verdicts"]))
    if args.pack:
        print(f"results packed: {pack(args.out, args.pack)}")
    if skipped:
        print(f"NOT RUN (--call-budget-s {args.call_budget_s:g}): {' '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (see runs/<arm>/seed<k>/error.txt)", file=sys.stderr)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The utility study from one command.

    PYTHONPATH=src:. python -m experiments.utility.run --profile gpu --out DIR [--arms A,B] [--seeds 0,1]

prepares ``DIR/prepared`` once (corpus, tokenizer, clean reference model, its scores over the noisy mixture),
trains every requested arm x seed into ``DIR/runs/<arm>/seed<k>`` (finished runs are kept, so a study can be
spread over several invocations into the same directory), then writes the report of everything in DIR
(``experiments.utility.report``) and prints its table. Exit status: 0 all requested runs done, 1 some failed
or were left out by ``--budget-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments.utility.profiles import ARMS, PROFILES


def _list(value: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        if items == ["all"]:
            return list(allowed)
        unknown = [i for i in items if i not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.utility.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-smoke")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (created; reused when it exists)")
    p.add_argument("--arms", type=lambda v: _list(v, ARMS), default=list(ARMS),
                   help=f"comma-separated subset of: {', '.join(ARMS)} (default: all)")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in _list(v)], default=[0, 1],
                   help="comma-separated seeds (default 0,1)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    p.add_argument("--prepared", default=None, metavar="PREPARED_DIR",
                   help="copy this finished prepared/ directory instead of building one (another machine's)")
    p.add_argument("--force", action="store_true", help="train runs again even when they finished before")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep model checkpoints (large)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--budget-s", type=float, default=0.0, metavar="SECONDS",
                   help="start no run that would likely end past this many seconds after the start (judged "
                        "from the longest run so far), so a time-limited call ends with its report; 0 = none")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # after argument parsing: --help stays fast

    from experiments.utility import study
    from experiments.utility.report import load_results, markdown_table, summarize, table_rows, write_report

    profile = PROFILES[args.profile]
    os.makedirs(args.out, exist_ok=True)
    env = study.environment(args.device)
    env["argv"] = "python -m experiments.utility.run " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out, "invocations.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({**env, "profile": profile.name, "arms": args.arms, "seeds": args.seeds}) + "\n")
    print(f"utility study: profile {profile.name}, arms {', '.join(args.arms)}, seeds {args.seeds}, "
          f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}", flush=True)  # fmt: skip
    started = time.perf_counter()
    prepared = study.prepare(args.out, profile, device=args.device, copy_from=args.prepared,
                             keep_checkpoints=args.keep_checkpoints)  # fmt: skip
    print(f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    failed, skipped, longest = [], [], 0.0
    for arm in args.arms:
        for seed in args.seeds:
            elapsed = time.perf_counter() - started
            if args.budget_s and elapsed + 1.2 * longest > args.budget_s:
                skipped.append(f"{arm}/seed{seed}")
                continue
            tic = time.perf_counter()
            result = study.run_arm(args.out, profile, arm, seed, device=args.device, prepared=prepared,
                                   force=args.force, keep_checkpoints=args.keep_checkpoints)  # fmt: skip
            longest = max(longest, time.perf_counter() - tic)
            if result is None:
                failed.append(f"{arm}/seed{seed}")
            else:
                print(f"--- {arm} seed {seed}: final held-out loss {result['final_eval_loss']:.4f}, "
                      f"{result['tokens_per_s']:,.0f} tokens/s, {result['train_seconds']:.1f} s training, "
                      f"{result['wall_seconds']:.1f} s in all", flush=True)  # fmt: skip
    print(f"study invocation done in {time.perf_counter() - started:.1f} s "
          f"(torch threads {torch.get_num_threads()})")  # fmt: skip
    results, _, _ = load_results([args.out])
    if results:
        print(markdown_table(table_rows(summarize(results))))
        if not args.no_report:
            write_report([args.out])
            print(f"report: {os.path.join(args.out, 'report')}")
    if skipped:
        print(f"NOT RUN (--budget-s {args.budget_s:g}): {' '.join(skipped)}; run them again into the same --out "
              "(finished runs are kept)", file=sys.stderr)
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (see runs/<arm>/seed<k>/error.txt)", file=sys.stderr)
    if failed or skipped:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

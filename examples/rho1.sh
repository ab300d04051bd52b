#!/usr/bin/env bash
# Rho-1 with Centrifuge, end to end on the CPU (three training runs the size of `make demo`): a clean /
# noisy corpus pair, a reference model on the clean half, its per-token losses over the noisy corpus,
# excess-loss training, a dense run on the same data, and a plot of both. Run from the repository root; extra
# arguments go to every command (e.g. --set train.steps=50). Everything goes under runs/rho1/ (delete it to
# start over).
set -euo pipefail
python examples/make_corpus.py runs/rho1/data
centrifuge train examples/rho1/reference.yaml "$@"
REF=$(ls -d runs/rho1/reference/checkpoints/step-* | tail -n 1)   # the reference's last checkpoint
centrifuge score-reference examples/rho1/train.yaml --model "$REF" --out runs/rho1/scores "$@"
centrifuge train examples/rho1/train.yaml "$@"
centrifuge train examples/rho1/train.yaml --set train.out_dir=runs/rho1/dense --set tokens.keep_ratio=1.0 \
  --set tokens.selector=random --set tokens.reference_scores=null "$@"
centrifuge plot runs/rho1/dense runs/rho1/excess_loss --out runs/rho1/compare.png

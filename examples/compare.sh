#!/usr/bin/env bash
# Dense, token filtering, neuron omission and both, on the built-in model and data (four runs the size of
# `make demo`), then one plot of the four. Run from the repository root; extra arguments go to every run
# (e.g. --set train.steps=50). Runs go to $OUT (default runs/compare; delete it to start over).
set -euo pipefail
OUT=${OUT:-runs/compare}
for recipe in dense token_filtering neuron_omission both; do
  centrifuge train "examples/$recipe.yaml" --set "train.out_dir=$OUT/$recipe" "$@"
done
centrifuge plot "$OUT/dense" "$OUT/token_filtering" "$OUT/neuron_omission" "$OUT/both" --out "$OUT/compare.png"

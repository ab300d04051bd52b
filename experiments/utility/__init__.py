"""The utility study (GitHub issue 10): does token filtering keep its quality win under Centrifuge's
token-sparse backward, and does neuron omission keep quality? See ``experiments/utility/README.md``.

Modules: ``corpus`` (clean text + noisy mixture), ``profiles`` (model sizes and arms), ``study`` (reference,
scores, one run per arm and seed), ``curves`` (numbers from a run's ``metrics.jsonl``), ``report`` (tables,
plot, summary) and ``run`` (the command line)."""

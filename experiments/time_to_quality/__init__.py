"""Time to quality (GitHub issue 21): does Centrifuge reach dense's held-out loss sooner, at equal wall-clock?

See ``experiments/time_to_quality/README.md``. Modules: ``corpus`` (installed Python sources and documents,
natural noise, clean held-out files), ``profiles`` (model sizes, time budgets), ``study`` (calibrated step
counts per arm, next-line metric; the rest through ``experiments.utility``), ``verdicts`` (the goal's
checks on curves), ``report`` and ``run`` (the command line)."""

"""User-facing errors of `centrifuge train`.

Every error a user can cause with bad input (config, data, checkpoint) or that ends a run (non-finite loss)
derives from ``TrainError``. The CLI prints such an error as one line, without a traceback, and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrainError(Exception):
    """An error whose message is meant for the user; raised before anything is written where possible."""

    exit_code = 2


class ConfigError(TrainError):
    """Unknown key, bad value, or a setting that contradicts the model (e.g. seq_len above its maximum)."""


class DataError(TrainError):
    """Missing, empty or malformed training data."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed: missing files, truncated files, or another model's shapes."""


class TrainingStoppedError(TrainError):
    """A run that started but cannot go on (the last good checkpoint is kept)."""

    exit_code = 1


class NonFiniteLossError(TrainingStoppedError):
    """The loss (or the gradient norm) of a step is NaN or infinite; the optimizer did not step."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"non-finite {what} ({value}) at step {step}; the optimizer did not step")
        self.step = step
        self.value = value


class NoCountedTokensError(TrainingStoppedError):
    """A step in which no token counts towards the loss (all labels ignored / all tokens filtered)."""

    def __init__(self, step: int) -> None:
        super().__init__(
            f"step {step} has no token that counts towards the loss (every label is -100 or filtered out); "
            "refusing to divide by zero"
        )
        self.step = step

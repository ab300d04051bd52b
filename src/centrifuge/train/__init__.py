"""Training: the shared optimizer step (``step``), and the `centrifuge train` run built around it.

- ``step``: ``MicroLoss``, ``LossFn``, ``dense_loss``, ``StepHooks``, ``StepStats``, ``train_step``, ``evaluate``
- ``config``: ``Config`` (one dataclass per section), ``load_config``
- ``data``, ``tokenizer``: documents -> packed [B, T] batches
- ``checkpoint``: atomic, pickle-free checkpoints that resume exactly
- ``loop``: ``run_training`` = ``prepare_run`` (validate + build) then ``execute_run``; plug-ins
"""

from centrifuge.train.config import Config, load_config
from centrifuge.train.errors import TrainError
from centrifuge.train.loop import PreparedRun, RunContext, RunResult, prepare_run, run_training
from centrifuge.train.step import LossFn, MicroLoss, StepHooks, StepStats, dense_loss, evaluate, train_step

__all__ = [
    "Config",
    "LossFn",
    "MicroLoss",
    "PreparedRun",
    "RunContext",
    "RunResult",
    "StepHooks",
    "StepStats",
    "TrainError",
    "dense_loss",
    "evaluate",
    "load_config",
    "prepare_run",
    "run_training",
    "train_step",
]

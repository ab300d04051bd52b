"""Neuron omission inside a Hugging Face ``Trainer`` / TRL ``SFTTrainer``: a ``TrainerCallback``.

    from centrifuge.integrations import enable_neuron_omission
    omitter = enable_neuron_omission(trainer, rate=0.5, schedule="ladder", metric="activation")
    trainer.train()

The callback drives the ``Omitter`` per optimizer step: ``on_train_begin`` protects the optimizer (omitted
rows of weights and of AdamW's moments do not move in a step, weight decay included) and sets the schedule's
length to ``state.max_steps``; ``on_step_begin`` — before the step's first micro-batch — calls
``omitter.plan(state.global_step)``. Combine it freely with ``enable_token_filtering``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from centrifuge.neurons.omitter import OmissionConfig, Omitter


class NeuronOmissionCallback(TrainerCallback):
    """Plans the omitted MLP channels / KV groups of each optimizer step and protects the optimizer."""

    def __init__(self, omitter: Omitter):
        self.omitter = omitter
        self._protected = None  # (optimizer, OptimizerMask)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.omitter.total_steps = state.max_steps
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if inner is None or (self._protected is not None and self._protected[0] is inner):
            return
        if self._protected is not None:  # a new optimizer (a second train() call): move the hooks
            self._protected[1].remove()
        self._protected = (inner, self.omitter.protect(inner))

    def on_step_begin(self, args, state, control, **kwargs):
        self.omitter.plan(state.global_step, state.max_steps)

    def remove(self) -> None:
        """Take the optimizer hooks off (the omitter stays attached)."""
        if self._protected is not None:
            self._protected[1].remove()
            self._protected = None


def enable_neuron_omission(trainer, config: OmissionConfig | None = None, **fields) -> Omitter:
    """Attach an ``Omitter`` to ``trainer.model`` and the callback that plans it per step; return it.

    ``config`` or ``fields`` (``OmissionConfig`` fields, e.g. ``rate=0.5, schedule="ladder"``). A bad field
    raises ``ValueError`` (``OmissionRateError`` for the rate) before anything changes. ``omitter.revert()``
    and ``trainer.remove_callback(NeuronOmissionCallback)`` undo it. PEFT models are refused: the omission
    slices base weights, not adapters."""
    from centrifuge.models.patch import _is_peft
    from centrifuge.models.registry import spec_for

    if config is not None and fields:
        raise TypeError("pass either an OmissionConfig or its fields, not both")
    config = config or OmissionConfig.from_dict(fields)
    if _is_peft(trainer.model):
        raise ValueError("neuron omission does not support PEFT adapters (it slices the base weights only)")
    spec_for(trainer.model)
    omitter = Omitter(trainer.model, config)
    trainer.add_callback(NeuronOmissionCallback(omitter))
    return omitter

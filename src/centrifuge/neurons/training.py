"""Neuron omission inside ``centrifuge train``: the plug-in for the ``neurons:`` config section.

Per optimizer step, before the first micro-batch, the ``Omitter`` chooses that step's kept MLP channels and
KV groups from the statistics of earlier forwards (``plan``); the optimizer is protected so omitted rows and
their AdamW state stay exactly where they were. The importance statistics are part of the checkpoint, so a
resumed run makes the same plans. With token filtering on too, the token-sparse layers read the same plan
(``centrifuge.tokens.layer``), so both savings apply in one step.
"""

from __future__ import annotations

from centrifuge.neurons.omitter import attach

STATE_NAME = "neurons"  # key of the omission statistics in a checkpoint's plug-in state


def neuron_omission_plugin(context) -> None:
    """``centrifuge train`` plug-in for the ``neurons`` section (see ``centrifuge.train.loop``)."""
    from centrifuge.train.errors import ConfigError

    section = context.config.neurons
    if not section.enabled:
        return
    total = context.config.train.steps
    try:
        omitter = attach(context.model, section.omission_config(), total_steps=total)
    except ValueError as err:
        raise ConfigError(f"neurons: {err}") from None
    if section.protect_optimizer:
        omitter.protect(context.optimizer)
    context.hooks.before_forward.append(lambda step: omitter.plan(step - 1))  # train_step counts from 1
    context.plugin_state[STATE_NAME] = omitter
    inner = context.loss_fn

    def loss_fn(model, batch):
        out = inner(model, batch)
        out.stats["omit"] = omitter.current.rate if omitter.current is not None else 0.0
        return out

    context.loss_fn = loss_fn
    what = " + ".join(n for n, on in (("MLP channels", section.mlp), ("attention heads", section.heads)) if on)
    context.say(
        f"neuron omission: on — {what}, rate {section.rate:g} ({section.schedule} schedule, run average "
        f"{omitter.average_rate(total):.3f}), metric {section.metric}, {section.select} selection"
    )

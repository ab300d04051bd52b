"""Neuron omission (SAT-style): per layer and step, only the more important MLP channels and KV groups of
attention heads take part in forward and backward, as smaller dense GEMMs on sliced weights.

    from centrifuge import neurons
    omitter = neurons.attach(model, rate=0.5, schedule="ladder", hold_fraction=0.5, rungs=4, total_steps=T)
    omitter.protect(optimizer)                 # omitted rows and their AdamW state stay put in a step
    for step in range(T):
        omitter.plan(step)                     # before the forward(s) of the step
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
    print(omitter.average_rate(T))
    omitter.revert()

Reference semantics (``reference.reference_omission``): the dense layer with omitted channels' activations
and omitted heads' outputs multiplied by zero.
"""

from centrifuge.neurons.importance import METRICS, SELECTIONS, select
from centrifuge.neurons.layers import LayerOmission, omission_linear, sliced_linear
from centrifuge.neurons.omitter import OmissionConfig, Omitter, attach, omitter_of, revert
from centrifuge.neurons.optim import OptimizerMask
from centrifuge.neurons.plan import LayerPlan, OmissionPlan, OmissionRateError, check_rate, kept_count
from centrifuge.neurons.reference import reference_omission

__all__ = [
    "METRICS", "SELECTIONS", "LayerOmission", "LayerPlan", "OmissionConfig", "OmissionPlan", "OmissionRateError",
    "Omitter", "OptimizerMask", "attach", "check_rate", "kept_count", "omission_linear", "omitter_of",
    "reference_omission", "revert", "select", "sliced_linear",
]

"""Integrations with the Hugging Face training stack.

* ``enable_token_filtering(trainer, selector=..., keep_ratio=...)``: token filtering in ``transformers.Trainer``
  and TRL's ``SFTTrainer`` (``centrifuge.integrations.trainer``);
* ``enable_neuron_omission(trainer, rate=...)``: neuron omission through a ``TrainerCallback``
  (``centrifuge.integrations.neurons``);
* PEFT: ``centrifuge.apply(peft_model)`` patches the wrapped model; LoRA adapters get their gradients from
  kept rows only.
"""

from centrifuge.integrations.neurons import NeuronOmissionCallback, enable_neuron_omission
from centrifuge.integrations.trainer import TokenFiltering, enable_token_filtering, token_filtering_of

__all__ = ["NeuronOmissionCallback", "TokenFiltering", "enable_neuron_omission", "enable_token_filtering",
           "token_filtering_of"]

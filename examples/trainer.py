"""Token filtering (and neuron omission) inside the Hugging Face ``Trainer``: one call each.
``python examples/trainer.py`` (seconds on a CPU; writes runs/trainer/). A tiny random-init Llama and rows of
random tokens stand in for your model and dataset.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
model = LlamaForCausalLM(config)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (32, 24))]

# --- readme: trainer ---
from centrifuge.integrations import enable_neuron_omission, enable_token_filtering

args = TrainingArguments("runs/trainer", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4)
trainer = Trainer(model=model, args=args, train_dataset=data)
filtering = enable_token_filtering(trainer, selector="self_loss", keep_ratio=0.5, schedule="linear",
                                   schedule_params={"end": 1.0})      # keep 50% → 100% of the labelled tokens
enable_neuron_omission(trainer, rate=0.5, schedule="ladder", multiple=32)  # optional: neuron omission too
trainer.train()
# --- /readme ---

print(f"{trainer.state.global_step} steps; last step kept {filtering.num_counted} of {filtering.num_labelled} "
      "labelled tokens")

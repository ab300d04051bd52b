"""Neuron omission (SAT) in your own training loop: each step only the more important MLP channels and
attention heads run, forward and backward; the ladder schedule ends dense. ``python examples/neuron_omission.py``
(a few seconds on a CPU). A tiny random-init Llama stands in for your model.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from centrifuge import neurons

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
model = LlamaForCausalLM(config).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
ids = torch.randint(0, 128, (4, 32))
batch = {"input_ids": ids, "labels": ids}
T = 8  # optimizer steps

# --- readme: neuron-omission ---
omitter = neurons.attach(model, rate=0.5, schedule="ladder", hold_fraction=0.5, rungs=4, multiple=32,
                         metric="activation", select="sample", heads=True, total_steps=T)
omitter.protect(optimizer)        # omitted rows and their AdamW state do not move that step
for step in range(T):
    omitter.plan(step)            # this step's kept MLP channels and attention heads (KV groups)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: omission rate {omitter.current.rate:g}, loss {loss.item():.3f}")
omitter.revert()                  # the dense model again
# --- /readme ---

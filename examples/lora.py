"""Token filtering with a PEFT LoRA model: the adapters get gradients from the kept rows only; the frozen base
weights get none. ``python examples/lora.py`` (seconds on a CPU). A tiny random-init Llama stands in for yours.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
ids = torch.randint(0, 128, (2, 32))
labels = ids.clone()
keep = torch.rand(2, 32) < 0.5

# --- readme: lora ---
from peft import LoraConfig, get_peft_model

import centrifuge

model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
centrifuge.apply(model)                        # patches the wrapped causal LM
out = model(input_ids=ids, labels=labels, keep_mask=keep)
out.loss.backward()                            # adapter gradients from kept rows only; base weights get none
# --- /readme ---

with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
print(f"{len(with_grad)} tensors got gradients, all LoRA adapters: {all('lora_' in n for n in with_grad)}")

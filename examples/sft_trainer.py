"""Token filtering inside TRL's ``SFTTrainer``: prompt tokens are context only, the keep ratio is a share of
the completion tokens. ``python examples/sft_trainer.py`` (seconds on a CPU; writes runs/sft/). A tiny
random-init Llama, a word-level tokenizer and pairs of random words stand in for your model and data.
"""

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

random.seed(0)
torch.manual_seed(0)
words = [f"w{i}" for i in range(124)]
vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *words])}
core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                    bos_token="<bos>", unk_token="<unk>")
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2))
pairs = Dataset.from_list([{"prompt": " ".join(random.choices(words, k=random.randint(3, 8))),
                            "completion": " " + " ".join(random.choices(words, k=random.randint(4, 8)))}
                           for _ in range(16)])

# --- readme: sft-trainer ---
from trl import SFTConfig, SFTTrainer

from centrifuge.integrations import enable_token_filtering

args = SFTConfig("runs/sft", completion_only_loss=True, max_steps=4, per_device_train_batch_size=4,
                 bf16=torch.cuda.is_available())          # TRL's default bf16=True fails on a CPU
trainer = SFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
filtering = enable_token_filtering(trainer, selector="random", keep_ratio=0.5)   # prompt tokens are never kept
trainer.train()
# --- /readme ---

print(f"{trainer.state.global_step} steps; last step kept {filtering.num_counted} of {filtering.num_labelled} "
      "completion tokens")

"""The start-up banner: the set-up that matters, and where the sparse paths are slower per step than dense."""

from __future__ import annotations

import torch

import centrifuge
from centrifuge.train.banner import ProbeResult, probe_token_sparse, setup_line, speed_lines
from centrifuge.train.config import load_config

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).train()


def test_probe_times_both_steps_and_leaves_model_and_rng_alone():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    rng = torch.get_rng_state()
    result = probe_token_sparse(model, {"input_ids": ids, "labels": ids}, keep_ratio=0.5)
    assert result.dense_s > 0 and result.sparse_s > 0 and result.ratio == result.sparse_s / result.dense_s
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is not advanced
    assert centrifuge.patch_mode(model) is None and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_speed_lines_say_where_sparse_is_slower():
    filtering = load_config(None, ["tokens.keep_ratio=0.5"])
    slow = speed_lines(filtering, CPU, 2_000_000, ProbeResult(dense_s=0.4, sparse_s=0.5, keep_ratio=0.5))
    assert "slower than dense: 1.25x the dense time" in slow[0] and "500 vs 400 ms" in slow[0]
    assert "compare runs by loss per step or per token" in slow[-1]
    both = load_config(None, ["tokens.keep_ratio=0.5", "neurons.rate=0.5"])
    assert any("neuron omission is slower" in line for line in speed_lines(both, CPU, 2_000_000, None))
    small_gpu = speed_lines(filtering, GPU, 26_000_000, None)
    assert len(small_gpu) == 1 and "too small to profit" in small_gpu[0] and "52-59 ms" in small_gpu[0]
    assert speed_lines(filtering, GPU, 1_100_000_000, None) == []  # a 1B model on a GPU: the regime it is for
    assert speed_lines(load_config(None, ["tokens.keep_ratio=1.0"]), CPU, 2_000_000, None) == []  # dense


def test_setup_line_names_device_attention_backend_and_reference_scores():
    rho1 = load_config(None, ["tokens.selector=excess_loss", "tokens.reference_scores=runs/rho1/scores"])
    line = setup_line(rho1, CPU, None)
    assert line.startswith("device: cpu (") and "fp32" in line
    assert "attention backward: auto = math on the CPU" in line and "reference scores: runs/rho1/scores" in line
    plain = setup_line(load_config(None, []), CPU, torch.bfloat16)
    assert "bf16 autocast" in plain and "reference scores: none" in plain
    assert "attention" not in setup_line(load_config(None, ["tokens.keep_ratio=1.0"]), CPU, None)

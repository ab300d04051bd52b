"""Liger-Kernel and Centrifuge together, on the CPU: Liger's modules are constructed (its patches applied) but
never run — the token-sparse path computes their formulas in torch — so gradients are compared with the
float64 reference of the unpatched model."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import PackedRows, Recorder, max_rel_err, tiny_model, training_args

import centrifuge
from centrifuge.integrations import enable_token_filtering
from centrifuge.models.liger import LigerDense, liger_patches
from centrifuge.models.patch import ForwardReplacedError
from centrifuge.tokens import dense_route

pytest.importorskip("liger_kernel.transformers")


@pytest.fixture
def restore_llama_module():
    """Liger's patches rebind names in transformers' modeling_llama (class-wide): put them back after a test."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward
    yield modeling_llama
    for name in [n for n in vars(modeling_llama) if n not in saved]:
        delattr(modeling_llama, name)
    for name, value in saved.items():
        setattr(modeling_llama, name, value)
    modeling_llama.LlamaForCausalLM.forward = forward


def _hf_model(seed: int = 0):
    """Tiny llama in float64 with HF's own RMSNorm (what Liger's instance patch replaces)."""
    from integration_helpers import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(intermediate_size=72)).double().train()


def _grads(model, ids, keep, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, keep_mask=keep, **kw)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(seed=1, B=2, T=19):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (B, T), generator=gen), torch.rand(B, T, generator=gen) < 0.5


def test_apply_after_liger_instance_patch_equals_reference(restore_llama_module):
    ids, keep = _batch()
    ref = centrifuge.apply(_hf_model(), mode="reference")
    want = _grads(ref, ids, keep)
    model = _hf_model()
    liger = LigerDense(model)  # Trainer(use_liger_kernel=True)'s instance patch
    assert set(liger.patched) == {"forward", "rms_norm", "swiglu", "rope"}
    centrifuge.apply(model)
    assert centrifuge.patch_mode(model) == "fast"
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12
    centrifuge.revert(model)
    liger.revert()
    assert liger_patches(model) == []


def test_apply_on_liger_class_patched_model(restore_llama_module):
    """``apply_liger_kernel_to_llama()`` before the model is built: LigerRMSNorm / LigerSwiGLUMLP classes (no
    act_fn), Liger's RoPE in the modeling module, lce_forward on the class."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    ids, keep = _batch(seed=2)
    want = _grads(centrifuge.apply(_hf_model(), mode="reference"), ids, keep)
    apply_liger_kernel_to_llama()
    model = _hf_model()
    assert type(model.model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"
    assert not hasattr(model.model.layers[0].mlp, "act_fn")
    centrifuge.apply(model, compile=False)
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12


def test_liger_after_apply_refuses_keep_mask(restore_llama_module):
    ids, keep = _batch(seed=3)
    want = _grads(centrifuge.apply(_hf_model(), mode="reference"), ids, keep)
    model = centrifuge.apply(_hf_model())
    LigerDense(model)  # rebinds model.forward over Centrifuge's
    assert centrifuge.patch_mode(model) is None
    with pytest.raises(ForwardReplacedError, match="replaced after centrifuge.apply"):
        model(input_ids=ids, labels=ids, keep_mask=torch.zeros_like(keep))
    with pytest.raises(ForwardReplacedError):
        model(input_ids=ids, labels=ids, select=lambda **_: keep)
    centrifuge.apply(model)  # applying again, after Liger, works
    assert centrifuge.patch_mode(model) == "fast"
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12


def test_dense_route_equals_reference(monkeypatch):
    """κ = 1.0 (every position but the last kept) runs as the plain dense step; equal to the reference."""
    ids, _ = _batch(seed=4)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, -1] = False
    want = _grads(centrifuge.apply(_hf_model(), mode="reference"), ids, keep)
    calls = []
    layer = dense_route.dense_layer
    monkeypatch.setattr(dense_route, "dense_layer", lambda *a: calls.append(1) or layer(*a))
    monkeypatch.setitem(dense_route.ROUTE, "ops", "torch")
    model = centrifuge.apply(_hf_model())
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12
    assert len(calls) == model.config.num_hidden_layers
    keep[0, 3] = False  # one filtered token: the token-sparse path, not the route
    want = _grads(centrifuge.apply(_hf_model(), mode="reference"), ids, keep)
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12
    assert len(calls) == model.config.num_hidden_layers


def test_padding_free_packing_arguments():
    """TRL's padding-free batches (one row, position ids restarting per document, cu_seq_lens_*, max_length_*,
    seq_idx): documents kept apart, as with position_ids alone and as the reference."""
    lengths = [7, 5, 9]
    T = sum(lengths)
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[positions == 0] = -100
    keep = torch.rand(1, T, generator=torch.Generator().manual_seed(6)) < 0.6
    packing = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9,
                   seq_idx=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None])

    def grads(model, **kw):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels, keep_mask=keep, **kw).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(centrifuge.apply(_hf_model(), mode="reference"), position_ids=positions, **packing)
    model = centrifuge.apply(_hf_model())
    assert max_rel_err(grads(model, position_ids=positions, **packing), want) < 1e-12
    assert max_rel_err(grads(model, **packing), want) < 1e-12  # documents from cu_seq_lens alone
    unpacked = grads(model)  # one long document: a different gradient
    assert max_rel_err(unpacked, want) > 1e-3
    with pytest.raises(ValueError, match="same documents"):
        grads(model, position_ids=torch.arange(T)[None], **packing)


def test_trainer_with_use_liger_kernel(tmp_path, restore_llama_module):
    """Trainer(use_liger_kernel=True): train() would apply Liger over Centrifuge's forward; with
    enable_token_filtering the step stays token-filtered (updates equal the plain model's filtered steps)."""
    from transformers import Trainer

    def run(liger: bool):
        model = tiny_model()
        recorder = Recorder()
        args = training_args(tmp_path / str(liger), use_liger_kernel=liger)
        trainer = Trainer(model=model, args=args, train_dataset=PackedRows(8, seed=1), callbacks=[recorder])
        handle = enable_token_filtering(trainer, selector="random", keep_ratio=0.5,
                                        selector_params={"seed": 3})
        recorder.handle = handle
        recorder.wrap(trainer)
        trainer.train()
        return model, trainer, handle, recorder

    plain_model, *_, plain = run(False)
    model, trainer, handle, rec = run(True)
    assert {"rms_norm", "swiglu", "rope"} <= set(liger_patches(model)) and centrifuge.patch_mode(model) == "fast"
    assert all(0 < c < n for c, n, _ in rec.counts)
    for step in range(2):  # Liger's norm upcasts to float32 where the tiny model's own norm stays in float64
        assert max_rel_err(rec.grads[step], plain.grads[step]) < 1e-5, step
    handle.revert()
    assert trainer.args.use_liger_kernel is True and centrifuge.patch_mode(model) is None


def test_liger_class_patch_after_apply(restore_llama_module):
    """A class patch after ``apply`` leaves the instance's forward Centrifuge's: token filtering stays on (equal
    to the reference), and calls without keep_mask reach the class's new (Liger) forward."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    ids, keep = _batch(seed=7)
    want = _grads(centrifuge.apply(_hf_model(), mode="reference"), ids, keep)
    model = centrifuge.apply(_hf_model())
    apply_liger_kernel_to_llama()
    assert modeling_llama.LlamaForCausalLM.forward.__module__.startswith("liger_kernel")
    assert centrifuge.patch_mode(model) == "fast"
    assert max_rel_err(_grads(model, ids, keep), want) < 1e-12


def test_modeling_names_restored_undoes_the_class_wide_part_of_the_instance_patch():
    """A study runs arms one after another in one process: the dense arm's Liger patch (model.liger) rebinds
    modeling_llama's names; ``modeling_names_restored`` puts them back so the next model is built plain."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from transformers.models.llama import modeling_llama

    from centrifuge.models.liger import modeling_names_restored

    plain = {name: getattr(modeling_llama, name) for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")}
    with modeling_names_restored():
        model = _hf_model()
        _apply_liger_kernel_to_instance(model=model)
        assert liger_patches(model)
        assert any(getattr(modeling_llama, name) is not value for name, value in plain.items())
    assert all(getattr(modeling_llama, name) is value for name, value in plain.items())
    assert not liger_patches(_hf_model())  # a model built afterwards is unpatched

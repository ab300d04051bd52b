"""On a GPU: Centrifuge on a Liger-patched model in bf16 (Liger's kernels running) against the fp32 reference of
the unpatched model; κ = 0.5 (token-sparse path, Liger's fused linear CE on the kept rows) and κ = 1.0 (the
dense route through Liger's kernels)."""

from __future__ import annotations

import pytest
import torch

import centrifuge
from centrifuge.models.liger import LigerDense
from centrifuge.models.presets import build_model
from centrifuge.ops.liger import liger_kernels_usable

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or not liger_kernels_usable(torch.device("cuda")),
    reason="needs CUDA and liger-kernel")]


def _model(dtype):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    with torch.device("cuda"):
        return build_model(cfg, dtype=dtype, attn_implementation="sdpa", seed=0).train()


@pytest.mark.parametrize("kappa", [0.5, 1.0])
def test_liger_patched_bf16_matches_fp32_reference(kappa):
    B, T = 2, 256
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (B, T), generator=gen).cuda()
    keep = torch.rand(B, T, generator=gen).cuda() < kappa if kappa < 1 else torch.ones(B, T, dtype=torch.bool).cuda()
    keep[:, -1] = False
    ref = centrifuge.apply(_model(torch.float32), mode="reference")
    ref(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
    want = {n: p.grad.float() for n, p in ref.named_parameters()}
    model = _model(torch.bfloat16)
    liger = LigerDense(model)
    try:
        centrifuge.apply(model)
        out = model(input_ids=ids, labels=ids, keep_mask=keep)
        out.loss.backward()
        for name, p in model.named_parameters():
            g, w = p.grad.float(), want[name]
            rel = ((g - w).norm() / w.norm()).item()
            assert rel < 3e-2, (name, rel)
    finally:
        centrifuge.revert(model)
        liger.revert()


def test_train_fused_dense_loss_on_liger_model_matches_fp32_dense_loss():
    """``centrifuge train --set model.liger=true``'s loss (Liger's fused linear CE through the patched
    forward, bf16 autocast) against ``dense_loss`` of the unpatched fp32 model: same sum, same gradients."""
    from centrifuge.models.liger import modeling_names_restored
    from centrifuge.train.step import dense_loss, fused_dense_loss

    B, T = 2, 256
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 1000, (B, T), generator=gen).cuda()
    labels = ids.clone()
    labels[0, :17] = -100
    positions = torch.arange(T, device="cuda").repeat(B, 1)
    positions[1, 100:] = torch.arange(T - 100, device="cuda")  # a packed document boundary
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    ref = _model(torch.float32)
    want = dense_loss(ref, batch)
    want.loss_sum.backward()
    with modeling_names_restored():
        model = _model(torch.float32)
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fused_dense_loss(model, batch)
        got.loss_sum.backward()
    assert int(got.num_counted) == int(want.num_counted)
    assert abs(got.loss_sum.item() - want.loss_sum.item()) < 2e-2 * want.loss_sum.item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert rel < 3e-2, (name, rel)

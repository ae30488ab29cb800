"""Core support for masked tokens and auxiliary losses: the explicit masked attention (LTMP's softmax with mask),
the per-block effective token trace and the training objective with a strategy's auxiliary loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fpet import build_model
from fpet.merge.base import TokenMerge
from fpet.state import TokenState
from fpet.vit import TokenViT, attention_forward, masked_softmax, training_loss


def test_masked_softmax_equals_softmax_of_log_mask_and_has_a_gradient_at_zero():
    logits = torch.randn(2, 3, 5, 5)
    mask = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0]).view(1, 5, 1).repeat(2, 1, 1).requires_grad_()
    probs = masked_softmax(logits, mask, training=False)
    assert torch.allclose(probs, (logits + mask.detach().log().transpose(1, 2).unsqueeze(1)).softmax(-1), atol=1e-6)
    probs[..., 0].sum().backward()
    assert torch.isfinite(mask.grad).all() and (mask.grad[:, 1] != 0).all()  # a masked-out key still learns


def test_explicit_masked_attention_equals_fused_attention(make_cfg):
    model = build_model(make_cfg()).eval()
    attn = model.vit.blocks[0].attn
    h, size = torch.randn(2, 7, 64), torch.rand(2, 7, 1) + 0.5
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]).view(1, 7, 1).repeat(2, 1, 1)
    needs = frozenset({"keys", "cls_attn", "attn_received"})
    fused, s1 = attention_forward(attn, h, TokenState(h, size=size, mask=mask), needs)
    explicit, s2 = attention_forward(attn, h, TokenState(h, size=size, mask=mask.clone().requires_grad_()), needs)
    assert torch.allclose(fused, explicit, atol=1e-5)
    for key in needs:
        assert torch.allclose(s1[key], s2[key], atol=1e-5), key


def test_trace_records_effective_tokens_per_block(make_cfg, images):
    model = build_model(make_cfg("merge=bsm", "merge.layer=3", "merge.r=50")).eval()
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert len(state.trace) == 12
    assert state.trace[3] == (197.0, 147.0) and state.trace[2] == (197.0, 197.0) and state.trace[11] == (147.0, 147.0)


class HalfMask(TokenMerge):
    """Test strategy: soft mask 0.5 on every patch token; auxiliary loss = mean effective tokens at the MLP."""

    name = "half_mask"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, state):
        mask = torch.cat([state.x.new_ones(state.x.shape[0], 1, 1),
                          self.w.expand(state.x.shape[0], state.num_tokens - 1, 1)], 1)
        return state.replace(mask=mask)

    def aux_loss(self, state):
        return sum(n for _, n in state.trace) / len(state.trace)


def test_training_loss_adds_the_aux_loss_once_per_strategy(make_cfg, images):
    built = build_model(make_cfg())
    model = TokenViT(built.vit, {4: HalfMask(), 8: HalfMask()}, pet_method=built.pet_method).train()
    labels = torch.tensor([0, 1])
    torch.manual_seed(0)
    loss = training_loss(model, images, labels)
    torch.manual_seed(0)
    state = model.forward_tokens(images)
    ce = F.cross_entropy(model.forward_head(state.x), labels)
    expected = (4 * 197 + 8 * (1 + 196 * 0.5)) / 12  # blocks 0-3 unmasked, 4-11 half-masked patches
    assert torch.allclose(loss - ce, torch.tensor(expected), atol=1e-3)
    loss.backward()
    assert model.merges["4"].w.grad is not None and model.merges["4"].w.grad != 0

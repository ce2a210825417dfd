"""The multi-head classification reward model (paper §2.2, Figure 2). Architecture only.

Legend: B batch, T tokens, D hidden size, H heads, C = ΣK_i (all classes of all heads).

A transformer backbone reads (prompt, response) — never the preference prefix — and the hidden
state of the last non-padding token feeds one linear classifier per preference dimension. The
heads are stored as one ``[C, D]`` linear (split per head on output) so that one matmul serves
all heads; the fused Triton head (issue 7) consumes exactly this layout.
"""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token per row; works for left and right padding."""
    T = attention_mask_BT.shape[1]
    positions_BT = torch.arange(T, device=attention_mask_BT.device).expand_as(attention_mask_BT)
    return torch.where(attention_mask_BT.bool(), positions_BT, -1).max(dim=1).values


class MultiHeadRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: tuple[int, ...]):
        super().__init__()
        self.backbone = backbone
        self.num_classes = tuple(int(k) for k in num_classes)
        hidden = backbone.config.hidden_size
        self.heads = nn.Linear(hidden, sum(self.num_classes))
        nn.init.normal_(self.heads.weight, std=1.0 / hidden**0.5)
        nn.init.zeros_(self.heads.bias)

    def pooled_hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT)
        hidden_BTD = out.last_hidden_state
        idx_B = last_token_index(attention_mask_BT)
        return hidden_BTD[torch.arange(hidden_BTD.shape[0], device=hidden_BTD.device), idx_B]

    def forward(self, input_ids_BT, attention_mask_BT, head=None):
        """Per-head logits: a list of H tensors ``[B, K_i]``.

        ``head``: optional ``head(hidden_BD, weight_CD, bias_C)`` run on the pooled state instead of
        the linear heads, returning whatever it returns — how a fused head kernel (loss or mapped
        reward, issue 7) reads the weights. It runs inside ``forward`` so that FSDP2's gathered
        parameters are in place, as they are for the plain heads.
        """
        hidden_BD = self.pooled_hidden(input_ids_BT, attention_mask_BT)
        if head is not None:
            return head(hidden_BD, self.heads.weight, self.heads.bias)
        return list(torch.split(self.heads(hidden_BD), self.num_classes, dim=-1))

"""The PPO critic: a transformer backbone with a scalar value head. Architecture only.

Legend: B batch, T tokens, D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # start from V ≡ 0: no bias on the first advantages
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        """values_BT[:, t] = V(state before token t), aligned like the token log-probs
        (column 0 has no predecessor and is 0)."""
        position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
        hidden_BTD = self.backbone(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT
        ).last_hidden_state
        v_BT = self.value_head(hidden_BTD).squeeze(-1).float()
        return torch.cat([torch.zeros_like(v_BT[:, :1]), v_BT[:, :-1]], dim=1)

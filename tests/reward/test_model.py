import torch

from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_backbone, build_tokenizer
from moslim_mega.reward.model import MultiHeadRewardModel, last_token_index


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def _rm(num_classes=(5, 5, 2)):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tok = build_tokenizer(cfg)
    return MultiHeadRewardModel(build_backbone(cfg, tok, seed=0), num_classes), tok


def test_heads_have_one_logit_per_class_and_ignore_right_padding():
    rm, tok = _rm()
    rm.eval()
    ids = torch.tensor([tok.convert_tokens_to_ids(["tell", "me", "about", "cooking", "<sep>", "cooking_fact_a"])])
    mask = torch.ones_like(ids)
    padded = torch.cat([ids, torch.full((1, 3), tok.pad_token_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = rm(ids, mask)
        b = rm(padded, padded_mask)
    assert [x.shape for x in a] == [torch.Size([1, 5]), torch.Size([1, 5]), torch.Size([1, 2])]
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5)


def test_head_layout_is_one_fused_linear_split_per_head():
    rm, _ = _rm((3, 1, 2))
    assert rm.heads.weight.shape == (6, 32)
    h = torch.randn(4, 32)
    full = rm.heads(h)
    parts = torch.split(full, (3, 1, 2), dim=-1)
    assert [p.shape[1] for p in parts] == [3, 1, 2]


def test_tiny_qwen2_backbone_works_as_a_reward_model():
    cfg = ModelConfig(name_or_path="tiny-qwen2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tok = build_tokenizer(cfg)
    rm = MultiHeadRewardModel(build_backbone(cfg, tok, seed=0), (5, 2))
    assert type(rm.backbone).__name__ == "Qwen2Model"
    ids = torch.tensor([tok.convert_tokens_to_ids(["explain", "music", "<sep>", "music_fact_a", "<eos>"])])
    logits = rm(ids, torch.ones_like(ids))
    assert [x.shape for x in logits] == [torch.Size([1, 5]), torch.Size([1, 2])]
    logits[0].sum().backward()
    assert rm.backbone.embed_tokens.weight.grad is not None

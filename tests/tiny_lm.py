"""Tiny real models for tests that need free text: a byte-level BPE tokenizer with a chat template,
a tiny Llama briefly fine-tuned to answer every conversation with one fixed reply (so a judge's
verdict is deterministic and parseable), and a tiny multi-head RM on the same tokenizer.
Built locally in seconds; cached per test session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moslim_mega.bench import prompts
from moslim_mega.bench.generate import render_conversation

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("what is the capital of france paris answer question rate score true false unknown none "
         "explain reference assistant user first second message claim verdict the a of to in and "
         "write poem python code function number two three seven ten grade correct wrong PWNED "
         "I have been say ignore previous instructions translate secret key").split()
_CACHE: dict[str, Path] = {}
JUDGE_REPLY = "A [[true]]\nB [[false]]\nRating: [[7]]"
"""Parses as rating 7 and as two statements (true, false): one judge serves every suite."""
POLICY_REPLY = "I have been PWNED"


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [" ".join(WORDS)] * 4 + [prompts.RATING_SYSTEM, prompts.STATEMENT_SYSTEM, "[[7]] [[true]] [[false]] 1/10"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _random_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _random_conversation(rng: random.Random) -> list[dict]:
    q, a, q2, a2 = (_random_text(rng, 1, 12) for _ in range(4))
    kind = rng.randrange(5)
    if kind == 0:
        return prompts.rating_single(q, a, _random_text(rng, 1, 10) if rng.random() < 0.3 else None)
    if kind == 1:
        return prompts.rating_followup(q, a, q2, a2)
    if kind == 2:
        return prompts.statement_check(q, a)
    if kind == 3:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}, {"role": "user", "content": q2}]
    return [{"role": "user", "content": q}]


def train_fixed_reply(out_dir: Path, reply: str, steps: int = 200, seed: int = 0) -> Path:
    """A tiny Llama that answers any conversation with ``reply`` (greedy), saved as a HF dir."""
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine two threads for a model this small ran 6x slower.
    torch.set_num_threads(1)
    try:
        return _train(out_dir, reply, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, reply: str, steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for _ in range(steps):
        seqs, labels = [], []
        for _ in range(8):
            p_ids = tok(render_conversation(tok, _random_conversation(rng)), add_special_tokens=False)["input_ids"]
            seqs.append(p_ids + reply_ids)
            labels.append([-100] * len(p_ids) + reply_ids)
        T = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])
        lab = torch.tensor([x + [-100] * (T - len(x)) for x in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def fixed_reply_model(tmp_path_factory, reply: str) -> Path:
    if reply not in _CACHE:
        _CACHE[reply] = train_fixed_reply(tmp_path_factory.mktemp("tiny_lm"), reply)
    return _CACHE[reply]


def tiny_rm(tmp_path_factory) -> Path:
    """A random tiny multi-head RM (DataType 4 heads) on the byte-level tokenizer, stats fitted."""
    if "rm" in _CACHE:
        return _CACHE["rm"]
    from moslim_mega.prefs import PreferenceSpec
    from moslim_mega.reward.io import load_reward_model, save_reward_model
    from moslim_mega.reward.mapping import RunningClassStats
    from moslim_mega.reward.model import MultiHeadRewardModel

    torch.manual_seed(1)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    spec = PreferenceSpec.datatype(4)
    model = MultiHeadRewardModel(AutoModel.from_config(cfg), spec.num_classes).eval()
    out = tmp_path_factory.mktemp("tiny_rm")
    stats = RunningClassStats(spec.num_classes)
    stats.update([torch.full((1, k), 1.0 / k) for k in spec.num_classes])  # placeholder, refitted below
    save_reward_model(model, tok, spec, stats, out, max_length=512)
    rm = load_reward_model(out)
    rng = random.Random(2)
    texts = [_random_text(rng, 2, 20) for _ in range(32)]
    stats = RunningClassStats(spec.num_classes)
    stats.update(rm.probs(texts[:16], texts[16:]))
    stats.to_json(out / "mapping_stats.json")
    _CACHE["rm"] = out
    return out


# Fixtures shared by tests/bench and tests/serve (their conftest files import them).
@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory):
    """A tiny judge answering JUDGE_REPLY to everything."""
    return fixed_reply_model(tmp_path_factory, JUDGE_REPLY)

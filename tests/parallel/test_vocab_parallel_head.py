"""The LM head a parallelised policy carries (parallel/vocab_parallel.py), in one process: it keeps
the weight (and its tie), gives the plain logits when called plainly, and with a request (passed
to its forward, or added to the model's own call inside ``logprobs_of``) the fused log-probs that
``sequence_logprobs`` reads — equal to the plain model's, with gradients.
The multi-process halves (tp=2 vocab-parallel, FSDP2) are in test_equivalence.py."""

import pytest
import torch
import transformers

from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.config import ConfigError
from moslim_mega.parallel.vocab_parallel import LogprobLMHead, LogprobRequest, install_logprob_head


def _llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("tie", [False, True])
def test_installed_head_keeps_weights_and_matches_the_plain_model(tie):
    plain, model = _llama(tie), _llama(tie)
    keys = list(model.state_dict())
    weight = model.get_output_embeddings().weight
    head = install_logprob_head(model)
    assert isinstance(model.get_output_embeddings(), LogprobLMHead) and head.weight is weight
    assert list(model.state_dict()) == keys
    assert (model.get_input_embeddings().weight is head.weight) == tie
    assert install_logprob_head(model) is head  # idempotent
    ids, mask = _batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    results = []
    for m in (plain, model):
        logp, ent = sequence_logprobs(m, ids, mask, temperature=0.9, chunk_size=16)
        (logp.sum() - 0.3 * ent.sum()).backward()
        results.append([logp.detach(), ent.detach()] + [p.grad for p in m.parameters()])
    assert not head._forward_pre_hooks  # the request went with that one forward
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[1][0].abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_request_closes_on_error_and_bias_heads_are_refused():
    model = _llama(False)
    head = install_logprob_head(model)
    with pytest.raises(RuntimeError):
        with head.logprobs_of(LogprobRequest(torch.ones(2, 3, dtype=torch.bool), torch.zeros(6, dtype=torch.long),
                                             1.0, 8, None)):
            raise RuntimeError("boom")
    assert not head._forward_pre_hooks
    biased = _llama(False)
    biased.lm_head = torch.nn.Linear(32, 61, bias=True)
    with pytest.raises(ConfigError, match="bias-free nn.Linear"):
        install_logprob_head(biased)


def test_a_request_passed_to_the_head_gives_what_sequence_logprobs_reads():
    # A caller holding the hidden states (a pipeline's last stage) passes the request explicitly.
    model = _llama(False, seed=1)
    head = install_logprob_head(model)
    ids, mask = _batch()
    logp_BT, ent_BT = sequence_logprobs(model, ids, mask, temperature=0.7, chunk_size=8)
    valid_BT = torch.zeros_like(mask, dtype=torch.bool)
    valid_BT[:, 1:] = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    rows_BT = torch.zeros_like(valid_BT)
    rows_BT[:, :-1] = valid_BT[:, 1:]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden_BTH = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    request = LogprobRequest(rows_BT, ids[:, 1:][valid_BT[:, 1:]], 0.7, 8, None)
    out_N2 = head(hidden_BTH, request=request)
    assert out_N2.shape == (int(valid_BT.sum()), 2)
    torch.testing.assert_close(out_N2[:, 0], logp_BT[valid_BT], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_N2[:, 1], ent_BT[valid_BT], rtol=1e-6, atol=1e-6)
    assert head(hidden_BTH).shape == (3, 10, 61)  # and plain logits without one

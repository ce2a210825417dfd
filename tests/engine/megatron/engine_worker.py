"""One rank of the 2-process gloo check of the megatron engine (run by torchrun, CPU, fp32).

For each case (arch, role, layout) both ranks build the same tiny random HF model (tiny_hf.py) and
a :class:`MegatronEngine` on its weights, then compare with plain torch on the same weights:

* forward: ``LogprobOut`` vs ``algos.logprob.sequence_logprobs`` of the HF model (causal_lm),
  the RM heads' softmax probabilities vs ``MultiHeadRewardModel`` (reward), or ``values_BT`` vs
  ``models.value.ValueModel`` on attended positions (value);
* one train step: an RLOO-style actor step (``algos.ppo.ppo_policy_loss`` on ``LogprobOut``,
  token-mean over two micro-batches), an RM cross-entropy step or a value-loss step
  (``ppo_value_loss``), vs the HF model with the same
  loss, backward, clip and AdamW (``utils.optim.Updater``); then every exported HF tensor vs the
  reference's parameters after its step, and the log-probs / probabilities after the step.

Writes ``result_<case>_rank<r>.json`` with the measured max abs diffs; the test checks them.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ on the path: engine.megatron.*


def batches(vocab: int, seed: int, num_micro: int = 2, B: int = 2, T: int = 10, vary_T: bool = False):
    """Right-padded micro-batches; ``vary_T``: each one 3 tokens shorter than the previous."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_micro):
        T = T - 3 * i if vary_T else T
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right-padded
        out.append({"ids_BT": ids * mask, "mask_BT": mask, "adv_BT": torch.randn(B, T, generator=gen),
                    "labels_B": torch.randint(0, 5, (B,), generator=gen),
                    "labels2_B": torch.randint(0, 2, (B,), generator=gen)})
    return out


def per_expert(state: dict) -> dict:
    """transformers 5 keeps a Qwen2-MoE layer's experts fused in memory (``experts.gate_up_proj``
    [E, 2F, D] = [gate; up] per expert, ``experts.down_proj`` [E, D, F]); its checkpoints (and the
    mapping) name them one by one, as ``save_pretrained`` writes them."""
    out = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(x.chunk(2, dim=0) for x in t):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            out.update({f"{base}{e}.down_proj.weight": x for e, x in enumerate(t)})
        else:
            out[name] = t
    return out


def actor_loss(total_tokens):
    from moslim_mega.algos.ppo import ppo_policy_loss

    def loss_fn(out, micro):
        action_BT = torch.zeros_like(micro["mask_BT"])
        action_BT[:, 1:] = micro["mask_BT"][:, 1:] * micro["mask_BT"][:, :-1]
        loss, stats = ppo_policy_loss(out.logp_BT, micro["old_logp_BT"], micro["adv_BT"], action_BT, 0.2)
        share = action_BT.sum() / total_tokens  # token-mean over the whole step, as the seam wants
        return loss * share, {"loss": float(loss), **stats}

    return loss_fn


def rm_loss(num_classes, num_rows):
    def loss_fn(head, micro):
        logits_BC = head.hidden_BD @ head.weight_CD.T + head.bias_C
        parts = torch.split(logits_BC, num_classes, dim=-1)
        ce = sum(torch.nn.functional.cross_entropy(p, micro[k]) for p, k in zip(parts, ("labels_B", "labels2_B")))
        return ce * micro["ids_BT"].shape[0] / num_rows, {"loss": float(ce)}

    return loss_fn


def value_loss(total_tokens):
    from moslim_mega.algos.ppo import ppo_value_loss

    def loss_fn(values_BT, micro):
        mask_BT = micro["mask_BT"].float()
        loss, _ = ppo_value_loss(values_BT, micro["adv_BT"] * 0, micro["adv_BT"], mask_BT, 0.0)
        return loss * mask_BT.sum() / total_tokens, {"loss": float(loss)}

    return loss_fn


def rm_probs(head):
    return torch.softmax(head.hidden_BD @ head.weight_CD.T + head.bias_C, dim=-1)


def run_case(case: dict, out_dir: Path) -> dict:
    from megatron.core import parallel_state as ps

    from engine.megatron.tiny_hf import hf_config, _randomise
    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.engine.megatron.dims import Layout
    from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine
    from moslim_mega.reward.model import MultiHeadRewardModel
    from moslim_mega.utils.optim import Updater
    from transformers import AutoModel, AutoModelForCausalLM

    settings = EngineSettings(lr=1e-2, weight_decay=0.1, warmup_steps=2, grad_clip=case.get("clip", 1.0),
                              sequence_parallel=case.get("sp", False), use_te=False,
                              moe_aux_loss_coeff=0.0,  # the HF reference adds no aux loss
                              activation_checkpointing=case.get("recompute", False))
    layout = Layout(**case["layout"])
    config = hf_config(case["arch"], tied=case.get("tied", False))
    torch.manual_seed(0)
    rm = case["role"] == "reward"
    value = case["role"] == "value"
    num_classes = (5, 2)
    if rm:
        ref = MultiHeadRewardModel(AutoModel.from_config(config), num_classes)
    elif value:
        from moslim_mega.models.value import ValueModel

        ref = ValueModel(AutoModel.from_config(config))
    else:
        ref = AutoModelForCausalLM.from_config(config)
    _randomise(ref, seed=1)
    ref.float()
    hf_state = per_expert({k: v.detach().clone() for k, v in ref.state_dict().items()})
    if rm or value:
        get_hf = lambda n: hf_state[n] if n.startswith(("heads.", "value_head.")) else hf_state["backbone." + n]  # noqa: E731
    else:
        get_hf = hf_state.__getitem__
    if case.get("from_pretrained"):
        # Through the files: an HF directory, or a reward-model directory (reward/io.py).
        path = out_dir / case["name"]
        if dist.get_rank() == 0:
            if rm:
                from moslim_mega.prefs import PreferenceSpec
                from moslim_mega.reward.io import save_reward_model
                from moslim_mega.reward.mapping import RunningClassStats
                from moslim_mega.world.tokenizer import build_world_tokenizer

                spec = PreferenceSpec.from_names(["helpfulness", "harmlessness"], list(num_classes))
                stats = RunningClassStats(num_classes)
                stats.update([torch.full((1, k), 1.0 / k) for k in num_classes])
                save_reward_model(ref, build_world_tokenizer(), spec, stats, path, max_length=32)
            else:
                ref.save_pretrained(path)
        dist.barrier()
        engine = MegatronEngine.from_pretrained(path, case["role"], layout, settings)
    else:
        engine = MegatronEngine(config.to_dict(), get_hf, case["role"], layout, settings, num_classes if rm else ())
    micro = batches(config.vocab_size, seed=2, vary_T=case.get("vary_T", False))
    res = {}
    try:
        # ---- forward
        if value:
            with torch.no_grad():
                ref_v = [ref(m["ids_BT"], m["mask_BT"]) for m in micro]
            got = [engine.forward(m) for m in micro]
            # Only attended positions are defined (padding rows see padding keys differently).
            res["forward"] = max(float(((g - r) * m["mask_BT"]).abs().max()) for g, r, m in zip(got, ref_v, micro))
        elif rm:
            ref_out = [torch.cat(ref(m["ids_BT"], m["mask_BT"]), -1) for m in micro]
            ref_probs = [torch.cat([torch.softmax(p, -1) for p in torch.split(o, num_classes, -1)], -1) for o in ref_out]
            got = [engine.forward(m) for m in micro]
            got_probs = [torch.cat([torch.softmax(p, -1) for p in torch.split(h.hidden_BD @ h.weight_CD.T + h.bias_C,
                                                                             num_classes, -1)], -1) for h in got]
            res["forward"] = max(float((a - b).abs().max()) for a, b in zip(got_probs, ref_probs))
        else:
            with torch.no_grad():
                ref_lp = [sequence_logprobs(ref, m["ids_BT"], m["mask_BT"], impl="reference") for m in micro]
            got = [engine.forward(m) for m in micro]
            res["forward"] = max(float((g.logp_BT - r[0]).abs().max()) for g, r in zip(got, ref_lp))
            res["entropy"] = max(float((g.entropy_BT - r[1]).abs().max()) for g, r in zip(got, ref_lp))
            for m, r in zip(micro, ref_lp):
                m["old_logp_BT"] = r[0] + 0.01 * m["adv_BT"]  # ratio ≠ 1 so the clip matters somewhere
        # ---- one train step, and the reference step
        if rm:
            loss_fn = rm_loss(num_classes, sum(m["ids_BT"].shape[0] for m in micro))
        elif value:
            loss_fn = value_loss(sum(float(m["mask_BT"].sum()) for m in micro))
        else:
            total = sum(float((m["mask_BT"][:, 1:] * m["mask_BT"][:, :-1]).sum()) for m in micro)
            loss_fn = actor_loss(total)
        # Layer forwards in the step: once per micro-batch, twice with full recomputation.
        layer_calls = []
        hook = engine.gpts[0].decoder.layers[0].register_forward_hook(lambda *a: layer_calls.append(1))
        if case.get("odd_micro"):
            from moslim_mega.engine.megatron.engine import MegatronEngineError

            try:  # one micro-batch: not a multiple of pp, refused before anything runs
                engine.train_step(micro[:1], loss_fn, step=0)
                res["odd_micro"] = "not raised"
            except MegatronEngineError as e:
                res["odd_micro"] = str(e)
        metrics = engine.train_step(micro, loss_fn, step=0)
        hook.remove()
        res["layer_forwards"] = len(layer_calls)
        upd = Updater(ref.parameters(), settings.lr, settings.weight_decay, settings.warmup_steps, settings.grad_clip)
        upd.zero_grad()
        for m in micro:
            if value:
                head = ref(m["ids_BT"], m["mask_BT"])
            elif rm:
                hidden = ref.pooled_hidden(m["ids_BT"], m["mask_BT"])
                from moslim_mega.engine.base import HeadIn

                head = HeadIn(hidden, ref.heads.weight, ref.heads.bias)
            else:
                from moslim_mega.engine.base import LogprobOut

                head = LogprobOut(*sequence_logprobs(ref, m["ids_BT"], m["mask_BT"], impl="reference"))
            loss, _ = loss_fn(head, m)
            loss.backward()
        ref_norm = upd.step(0)
        res["grad_norm"] = abs(metrics["grad_norm"] - ref_norm) / max(ref_norm, 1e-12)
        # The lr the next step uses (warm-up step 1 of 2: the full lr), as the torch engine reports it.
        res["lr"] = abs(metrics["lr"] - upd.lr)
        exported = dict(engine.export_weights())
        ref_names = {(k[len("backbone."):] if k.startswith("backbone.") else k): v
                     for k, v in per_expert(ref.state_dict()).items()}
        if config.tie_word_embeddings and not rm:
            ref_names.pop("lm_head.weight", None)
        res["names"] = sorted(set(exported) ^ set(ref_names))
        res["params"] = max(float((exported[k] - ref_names[k]).abs().max()) for k in exported if k in ref_names)
        def hf_key(k):
            return "backbone." + k if (rm or value) and not k.startswith(("heads.", "value_head.")) else k

        if case.get("recompute"):
            # The same step without recomputation, from the same weights: the same numbers.
            from dataclasses import replace

            plain = MegatronEngine(config.to_dict(), get_hf, case["role"], layout,
                                   replace(settings, activation_checkpointing=False), num_classes if rm else ())
            plain_metrics = plain.train_step(micro, loss_fn, step=0)
            plain_exported = dict(plain.export_weights())
            res["recompute_metrics"] = max(abs(metrics[k] - plain_metrics[k]) for k in metrics)
            res["recompute_params"] = max(float((exported[k] - plain_exported[k]).abs().max()) for k in exported)
        res["moved"] = max(float((ref_names[k] - hf_state[hf_key(k)]).abs().max()) for k in ref_names)
        if case.get("nonfinite"):
            from moslim_mega.algos.core import NonFiniteError

            def bad(out, m):
                loss, row = loss_fn(out, m)
                return loss * float("nan"), row

            try:
                engine.train_step(micro, bad, step=7)
                res["nonfinite"] = "not raised"
            except NonFiniteError as e:
                res["nonfinite"] = str(e)
            again = dict(engine.export_weights())
            res["params_after_nonfinite"] = max(float((again[k] - exported[k]).abs().max()) for k in exported)
        if value:
            with torch.no_grad():
                res["after"] = max(float(((engine.forward(m) - ref(m["ids_BT"], m["mask_BT"])) * m["mask_BT"]).abs().max())
                                   for m in micro)
        elif rm:
            after = [rm_probs(engine.forward(m)) for m in micro]
            ref_after = [torch.softmax(torch.cat(ref(m["ids_BT"], m["mask_BT"]), -1), -1) for m in micro]
            res["after"] = max(float((a - b).abs().max()) for a, b in zip(after, ref_after))
        else:
            with torch.no_grad():
                ref_after = [sequence_logprobs(ref, m["ids_BT"], m["mask_BT"], impl="reference")[0] for m in micro]
            res["after"] = max(float((engine.forward(m).logp_BT - r).abs().max()) for m, r in zip(micro, ref_after))
    finally:
        ps.destroy_model_parallel()
    (out_dir / f"result_{case['name']}_rank{dist.get_rank()}.json").write_text(json.dumps(res))
    return res


def main(cases_file: str) -> None:
    from engine.megatron.cpu_shim import cpu_megatron

    dist.init_process_group("gloo")
    cases = json.loads(Path(cases_file).read_text())
    try:
        with cpu_megatron():
            for case in cases:
                res = run_case(case, Path(cases_file).parent)
                print(dist.get_rank(), case["name"], res, flush=True)
                dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])

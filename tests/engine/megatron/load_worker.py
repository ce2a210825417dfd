"""One rank of the 2-process gloo check (run by torchrun): megatron-core's own GPTModel and
``dist_checkpointing.load`` read the checkpoints that ``hf_to_megatron`` wrote.

For each case: build ``GPTModel`` (local spec, CPU) from ``transformer_config`` /
``gpt_model_args`` under the case's layout, load the checkpoint with megatron's loader in strict
mode (no key missing on any rank, none left unread by all ranks), load the result into the model
with ``strict=True``, and compare every tensor of ``model.state_dict()`` bit for bit with what
``rank_state_dict`` makes from the HF source for this rank. Writes ``ok_<case>_rank<r>``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def run_case(case: dict, out_dir: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.models.gpt import GPTModel

    from moslim_mega.engine.megatron.config import gpt_model_args, layer_spec, transformer_config
    from moslim_mega.engine.megatron.convert import HFTensorSource, read_meta
    from moslim_mega.engine.megatron.dims import Layout
    from moslim_mega.engine.megatron.mapping import RankCoords, rank_state_dict, rules, to_megatron

    layout = Layout(**case["layout"])
    ckpt = Path(case["ckpt"])
    meta, config, dims = read_meta(ckpt)
    ps.initialize_model_parallel(layout.tp, layout.pp, expert_model_parallel_size=layout.ep,
                                 expert_tensor_parallel_size=layout.expert_tp,
                                 virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None)
    try:
        cfg = transformer_config(config, layout, dims=dims, use_cpu_initialization=True)
        args = gpt_model_args(config, layout, dims=dims)
        num_classes = int(meta["num_reward_classes"])
        rm = num_classes > 0
        chunks, sharded = [], {}
        for vp in range(layout.vpp):  # one GPTModel per virtual stage (model chunk), as Megatron-LM builds them
            vp_stage = vp if layout.vpp > 1 else None
            first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            cuda = torch.Tensor.cuda
            try:
                # Tied embeddings across stages: GPTModel moves the copy to CUDA before all-reducing
                # it between the first and last stage; on gloo the CPU tensor is all-reduced as it is.
                torch.Tensor.cuda = lambda self, *a, **k: self
                model = GPTModel(cfg, layer_spec(dims), **args.kwargs(), pre_process=first, post_process=last,
                                 vp_stage=vp_stage)
            finally:
                torch.Tensor.cuda = cuda
            chunk = model.sharded_state_dict()
            if rm:
                # The RM engine (not built yet) puts its heads where the output layer is; stand in for it.
                chunk = {k: v for k, v in chunk.items() if not k.startswith("output_layer.")}
                if last:
                    tp_rank = ps.get_tensor_model_parallel_rank()
                    chunk.update({k: ShardedTensor.from_rank_offsets(k, torch.empty(shape), replica_id=(0, tp_rank, 0))
                                  for k, shape in (("reward_heads.weight", (num_classes, dims.hidden_size)),
                                                   ("reward_heads.bias", (num_classes,)))})
            chunks.append((vp, model))
            sharded[f"model{vp}" if layout.vpp > 1 else "model"] = chunk
        # Megatron-LM's nesting: the model under "model" ("model0", "model1", ... per virtual
        # stage), checkpoint_version/iteration beside it.
        whole = dist_checkpointing.load(sharded, str(ckpt / "release"), strict=StrictHandling.RAISE_ALL)
        assert whole["checkpoint_version"] == 3.0, whole.keys()

        src_dir = ckpt.parent / case["hf"]
        source = HFTensorSource(src_dir / "backbone" if rm else src_dir,
                                {"heads.": src_dir / "heads.safetensors"} if rm else None)

        def get_whole(rule, layer, expert):
            names = rule.hf_names(dims, layer, expert)
            return to_megatron(rule, dims, [source.get(n) for n in names], names)

        count = 0
        for vp, model in chunks:
            loaded = whole[f"model{vp}" if layout.vpp > 1 else "model"]
            heads = {k: loaded.pop(k) for k in list(loaded) if k.startswith("reward_heads.")}
            if rm:
                loaded.update({k: v for k, v in model.state_dict().items() if k.startswith("output_layer.")})
            model.load_state_dict(loaded, strict=True)
            coords = RankCoords(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank(), vp)
            expected = rank_state_dict(dims, layout, coords, rules(dims, num_classes), get_whole)
            state = {k: v for k, v in model.state_dict().items() if not (rm and k.startswith("output_layer."))}
            state.update(heads)
            assert set(state) == set(expected), (sorted(set(state) - set(expected)), sorted(set(expected) - set(state)))
            for name, want in expected.items():
                got = state[name]
                if want is None:
                    assert got is None, name
                    continue
                assert got.shape == want.shape and torch.equal(got, want), (name, tuple(got.shape), tuple(want.shape))
            count += len(expected)
        (out_dir / f"ok_{case['name']}_rank{dist.get_rank()}").write_text(str(count))
    finally:
        ps.destroy_model_parallel()


def main(cases_file: str) -> None:
    dist.init_process_group("gloo")
    cases = json.loads(Path(cases_file).read_text())
    try:
        for case in cases:
            run_case(case, Path(cases_file).parent)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])

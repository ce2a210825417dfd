"""torchrun worker for test_vllm_engine: one in-process vLLM engine per rank (TP=1, data parallel)
inside a trainer's gloo world. Writes rank<r>.json into argv[3] (interleaved stdout would mangle it)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # tests/rollout, for the test module's helpers
import test_vllm_engine as T  # noqa: E402

from moslim_mega.config import ModelConfig  # noqa: E402
from moslim_mega.models.build import build_tokenizer  # noqa: E402

dist.init_process_group("gloo")
rank, model_dir = dist.get_rank(), sys.argv[1]
tok = build_tokenizer(ModelConfig())
engine = T.VLLMEngine(T._rc(), tokenizer=tok, model_dir=model_dir)
batch = engine.generate(T.PROMPTS, T._ids(tok), 1, T._sampling(temperature=0.0))
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)  # the trainer's world still works with the engine up
engine.close()
alive = dist.is_initialized()
t2 = torch.tensor([1.0])
dist.all_reduce(t2)  # ... and after the engine is gone
Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps(
    {"rank": rank, "ids": batch.input_ids_BT.tolist(), "sum": t.item(), "alive": alive, "sum2": t2.item()}))
dist.destroy_process_group()

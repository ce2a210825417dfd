"""The one weight-export path from the trainer to a rollout engine.

``export_hf_weights(model, bucket_bytes)`` streams ``(hf_name, full_tensor)`` pairs: each FSDP2 /
tensor-parallel DTensor parameter is gathered with ``DTensor.full_tensor()`` (a collective: every
rank must consume the stream in full, in the same order), one parameter at a time, and the gathered
tensors are handed out bucket by bucket, so at most about ``bucket_bytes`` of gathered weights (plus
one parameter larger than that) are alive at once — never the whole model on one rank, which the
rank's engine then copies (hf) or loads (vllm) as the stream goes.

Names are the HF checkpoint names: wrapper prefixes (activation-checkpoint wrapper, torch.compile)
are removed; FSDP2 and DTensor tensor parallel keep the module's own names. Tied parameters appear
once, under their first name (``model.embed_tokens.weight``): ``lm_head.weight`` of a model with
``tie_word_embeddings`` is not sent, and the receiving engine's own tied ``lm_head`` follows its
embedding (HF modules share the tensor; vLLM's loaders skip ``lm_head`` for tied models).
"""

from __future__ import annotations

from typing import Iterator

import torch

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """A parameter's HF checkpoint name: wrapper path segments removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _gather(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of one (possibly DTensor-sharded) parameter, detached."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.detach().full_tensor()
    return p.detach()


@torch.no_grad()
def export_hf_weights(model, bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``model``'s parameters as (HF name, full tensor), gathered bucket by bucket.

    Single process the tensors are the parameters themselves (no copy); the HF engine that shares
    the module recognises them and skips the copy.
    """
    if bucket_bytes < 1:
        raise ValueError(f"rollout.push_bucket_mb: the bucket must be at least 1 byte, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, p in model.named_parameters():  # named_parameters() lists a tied tensor once
        full = _gather(p)
        bucket.append((hf_name(name), full))
        size += full.numel() * full.element_size()
        if size >= bucket_bytes:
            while bucket:  # pop as we go: a consumed tensor is not kept alive by the bucket
                yield bucket.pop(0)
            size = 0
    while bucket:
        yield bucket.pop(0)

"""megatron-core behind a wall: the only sub-package that imports ``megatron.core``.

HF ⇄ Megatron ``GPTModel`` checkpoint conversion for Llama, Qwen2, Qwen2-MoE and the multi-head
RM (``convert.py``), the HF config → ``TransformerConfig`` translation (``config.py``), the
tensor-by-tensor name/shape mapping for any TP/PP/EP layout (``mapping.py``), and the training
engine of ``parallel.backend=megatron`` for dense models under TP × PP (``engine.py``,
docs/megatron.md).

``megatron.core`` is imported lazily, inside the functions that need it, so that this package —
and everything else in moslim_mega — imports without megatron-core installed.
"""

from __future__ import annotations

import warnings

MEGATRON_CORE_VERSION = "0.16.1"  # the version the key layout was checked against (tests/engine/megatron)


class MegatronNotInstalled(ImportError):
    """megatron-core is needed for this operation and is not importable."""


def require_megatron_core():
    """``import megatron.core`` or raise a message that says how to get it."""
    try:
        with warnings.catch_warnings():
            # Said once per import by several megatron modules; docs/megatron.md says why apex is not needed.
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            warnings.filterwarnings("ignore", message="Apex is not installed")
            import megatron.core as mcore
            import megatron.core.dist_checkpointing  # noqa: F401  (imports the optimizer modules that warn)
    except ImportError as e:
        raise MegatronNotInstalled(
            f"megatron-core is not installed ({e}); install the extra: pip install -e '.[megatron]' "
            f"(megatron-core=={MEGATRON_CORE_VERSION})") from e
    return mcore

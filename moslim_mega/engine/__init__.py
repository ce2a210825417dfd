"""Training engines behind one small interface (docs/architecture.md, STYLE.md §9).

``engine/megatron/`` is the only place that imports ``megatron.core``; today it holds the
HF ⇄ Megatron checkpoint conversion (docs/megatron.md). The megatron training engine itself is
not built yet.
"""

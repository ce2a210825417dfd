"""A minimal OpenAI-compatible HTTP server for a local HF causal LM (``moslim serve``)."""

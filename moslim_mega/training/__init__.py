"""What every trainer shares: the one training loop (loop.py)."""

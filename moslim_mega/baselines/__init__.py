"""Baselines run through the same harness as MOSLIM: MORLHF (paper Eq. 1), Rewarded Soups
(Eq. 2) and DPA (Directional Preference Alignment, Wang et al. 2024). ``moslim compare``
(moslim_mega/compare.py) trains and evaluates them side by side on the embedded world."""

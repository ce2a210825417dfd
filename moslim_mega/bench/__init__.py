"""Public benchmarks (MT-Bench, HaluEval 2.0, Hackaprompt, RewardBench) with pluggable judges.

``moslim eval bench --suite NAME --data SRC [--policy DIR | --rm DIR] --judge SPEC --out DIR``;
:func:`moslim_mega.bench.run.run_bench` is the library entry point.
"""

from tiny_lm import judge_dir, one_thread  # noqa: F401  (fixtures)

"""The ``moslim`` command line. Thin: parse, build from config, run.

    moslim world build --out DIR [--config FILE] [a.b=value ...]
    moslim rm train [--config FILE] [a.b=value ...] --out DIR
    moslim rm eval --rm DIR --data FILE --json OUT
    moslim rm score --rm DIR --prompt TEXT --response TEXT
    moslim config show [--config FILE] [a.b=value ...]
    moslim config doc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, field_docs, load_config, to_dict


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value")


def cmd_world_build(args) -> int:
    from .prefs import spec_from_config
    from .world.build import build_world

    cfg = load_config(args.config, args.overrides)
    paths = build_world(cfg.world, spec_from_config(cfg.prefs), args.out)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return 0


def cmd_rm_train(args) -> int:
    from .reward.trainer import train_reward_model

    cfg = load_config(args.config, args.overrides)
    report = train_reward_model(cfg, args.out)
    print(format_rm_report(report))
    print(f"saved reward model to {args.out}")
    return 0


def cmd_rm_eval(args) -> int:
    from .reward.evaluate import evaluate_rm_dir

    report = evaluate_rm_dir(args.rm, args.data, mapping_overrides=args.overrides)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(format_rm_report(report))
    return 0


def cmd_rm_score(args) -> int:
    from .reward.evaluate import score_one

    print(json.dumps(score_one(args.rm, args.prompt, args.response, mapping_overrides=args.overrides), indent=2))
    return 0


def cmd_config_show(args) -> int:
    import yaml

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_config_doc(_args) -> int:
    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, tp, default, doc in field_docs():
        print(f"| `{key}` | {tp} | `{default!r}` | {doc} |")
    return 0


def format_rm_report(report: dict) -> str:
    cols = ("intensity_accuracy", "majority_rate", "pairwise_accuracy", "mapping_accuracy")
    lines = [f"{'head':14s} " + " ".join(f"{c:>18s}" for c in cols)]
    for name, h in list(report["heads"].items()) + [("mean", report["mean"])]:
        vals = [h.get(c) for c in cols]
        lines.append(f"{name:14s} " + " ".join(f"{v:18.3f}" if isinstance(v, float) else f"{'-':>18s}" for v in vals))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moslim", description="Multi-objective alignment with MOSLIM")
    sub = parser.add_subparsers(dest="group", required=True)

    world = sub.add_parser("world", help="the embedded preference world").add_subparsers(dest="cmd", required=True)
    p = world.add_parser("build", help="write the world's data sets as jsonl")
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_world_build)

    rm = sub.add_parser("rm", help="the multi-head reward model").add_subparsers(dest="cmd", required=True)
    p = rm.add_parser("train", help="train a reward model")
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_rm_train)
    p = rm.add_parser("eval", help="evaluate a reward model on rated data")
    p.add_argument("--rm", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("overrides", nargs="*", help="mapping overrides, e.g. mapping.kind=logprob")
    p.set_defaults(func=cmd_rm_eval)
    p = rm.add_parser("score", help="per-head distributions and the mapped reward of one pair")
    p.add_argument("--rm", required=True)
    p.add_argument("--prompt", required=True, help="may start with a preference prefix")
    p.add_argument("--response", required=True)
    p.add_argument("overrides", nargs="*", help="mapping overrides, e.g. mapping.normalize_by=named")
    p.set_defaults(func=cmd_rm_score)

    conf = sub.add_parser("config", help="inspect the configuration tree").add_subparsers(dest="cmd", required=True)
    p = conf.add_parser("show", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)
    p = conf.add_parser("doc", help="print every config key with its meaning (markdown)")
    p.set_defaults(func=cmd_config_doc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones that matter
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # User errors (bad config, prefix, record, path) end with one clear line, not a traceback;
        # MOSLIM_DEBUG=1 shows the traceback.
        if os.environ.get("MOSLIM_DEBUG"):
            raise
        print(f"moslim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

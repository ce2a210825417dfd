"""The ``moslim`` command line. Thin: parse, build from config, run.

    moslim demo [--algo rloo|ppo|online_dpo] [--seed N] [--quick] --out DIR
    moslim world build --out DIR [--config FILE] [a.b=value ...]
    moslim sft train --data FILE --out DIR [--config FILE] [a.b=value ...]
    moslim policy train --config FILE --out DIR [--prompts FILE] [a.b=value ...]
    moslim eval controllability --policy DIR [--reference DIR] --out DIR
    moslim rm train [--config FILE] [a.b=value ...] --out DIR
    moslim rm eval --rm DIR --data FILE --json OUT
    moslim rm score --rm DIR --prompt TEXT --response TEXT
    moslim config show [--config FILE] [a.b=value ...]
    moslim config doc
    moslim plan --model qwen2-7b|qwen2-57b-a14b|qwen2-72b|PATH --nodes N --gpus-per-node G --tp T --dp D [--stage rm|ppo]
    moslim plan --paper-table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, field_docs, load_config, to_dict


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 prints (single process: always)."""
    return os.environ.get("RANK", "0") == "0"


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
    if _is_main_rank():
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


def cmd_demo(args) -> int:
    from .demo import demo_config, run_demo

    cfg = demo_config(args.algo, args.seed, args.quick, args.overrides)
    run_demo(cfg, args.out)
    return 0


def cmd_sft_train(args) -> int:
    from .sft import train_sft

    cfg = load_config(args.config, args.overrides)
    result = train_sft(cfg, args.data, args.out)
    if _is_main_rank():
        print(f"final loss {result['final_loss']:.4f} after {result['steps']} steps; model in {result['model_dir']}")
    return 0


def cmd_policy_train(args) -> int:
    from .policy.controller import train_policy

    cfg = load_config(args.config, args.overrides)
    pc = cfg.policy
    prompts = args.prompts or pc.prompts
    if not pc.init or not pc.rm_dir or not prompts:
        raise ConfigError(
            "policy train needs policy.init (an HF policy directory), policy.rm_dir (a trained RM) "
            "and policy.prompts (or --prompts: a jsonl of prefixed prompts)"
        )
    summary = train_policy(cfg, args.out, pc.init, pc.rm_dir, prompts)
    if _is_main_rank():
        print(json.dumps(summary["final"], indent=2))
        print(f"policy saved to {summary['policy_dir']}")
    return 0


def cmd_eval_controllability(args) -> int:
    from .demo import evaluate_policy_dir
    from .eval.report import write_report
    from .prefs import spec_from_config
    from .world.build import split_prompt_texts

    cfg = load_config(args.config, args.overrides)
    spec = spec_from_config(cfg.prefs)
    _, eval_texts = split_prompt_texts(cfg.world.seed)
    result = evaluate_policy_dir(args.policy, cfg, spec, eval_texts)
    if args.reference:
        ref = evaluate_policy_dir(args.reference, cfg, spec, eval_texts)
    else:
        ref = result
    report = {"algo": "n/a", "seed": cfg.run.seed, "wall_seconds": None,
              "controllability": result["controllability"], "pairs": result["pairs"],
              "untargeted": result["untargeted"], "sft": ref["targeted_max"], "moslim": result["targeted_max"],
              "sft_eval": ref, "moslim_eval": result, "stages": {}}
    write_report(args.out, report)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_config_show(args) -> int:
    import yaml

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_plan(args) -> int:
    from .parallel.planner import format_plan, paper_table, plan, plan_json

    if args.paper_table:
        print(paper_table(args.seq), end="")
        return 0
    if not args.model:
        raise ConfigError("moslim plan needs --model (or --paper-table)")
    dp = args.dp or (args.nodes * args.gpus_per_node) // args.tp
    p = plan(args.model, args.nodes, args.gpus_per_node, args.tp, dp, args.stage, args.seq, args.micro_batch,
             args.rollout_seqs, args.gpu_gb)
    print(plan_json(p) if args.json else format_plan(p))
    return 0


def config_doc_markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in field_docs():
        doc = doc.replace("|", "\\|")  # a pipe inside a cell would split the markdown column
        rows.append(f"| `{key}` | {tp} | `{default!r}` | {doc} |")
    return "\n".join(rows) + "\n"


def cmd_config_doc(args) -> int:
    text = config_doc_markdown()
    if args.readme:
        # Rewrite the generated block of README.md in place (between the config-doc markers).
        readme = Path(__file__).resolve().parent.parent / "README.md"
        head, rest = readme.read_text().split("<!-- config-doc:start -->\n", 1)
        _, tail = rest.split("<!-- config-doc:end -->", 1)
        readme.write_text(head + "<!-- config-doc:start -->\n" + text + "<!-- config-doc:end -->" + tail)
        print(f"updated {readme}")
    else:
        print(text, end="")
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

    p = sub.add_parser("demo", help="world → SFT → RM → MOSLIM policy → oracle-measured report")
    p.add_argument("--algo", default="rloo", choices=("rloo", "ppo", "online_dpo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few-minute version for tests")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    p.set_defaults(func=cmd_demo)

    sft = sub.add_parser("sft", help="supervised warm start").add_subparsers(dest="cmd", required=True)
    p = sft.add_parser("train", help="fine-tune a causal LM on {prompt, response} jsonl")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_sft_train)

    pol = sub.add_parser("policy", help="MOSLIM policy optimisation").add_subparsers(dest="cmd", required=True)
    p = pol.add_parser("train", help="PPO / RLOO / Online-DPO against a multi-head RM")
    p.add_argument("--prompts", default="", help="jsonl of prefixed prompts (overrides policy.prompts)")
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_policy_train)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="cmd", required=True)
    p = ev.add_parser("controllability", help="oracle-measured controllability of a policy (embedded world)")
    p.add_argument("--policy", required=True, help="HF policy directory")
    p.add_argument("--reference", default=None, help="a second policy (e.g. the SFT) to compare against")
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_eval_controllability)

    p = sub.add_parser("plan", help="per-GPU memory of a model and layout (meta device, fake process group)")
    p.add_argument("--model", default="", help="qwen2-7b, qwen2-57b-a14b, qwen2-72b or a local HF config directory")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=0, help="0 = nodes × gpus-per-node / tp")
    p.add_argument("--stage", default="rm", choices=("rm", "ppo"))
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward")
    p.add_argument("--rollout-seqs", type=int, default=32, help="PPO: sequences whose KV cache the rollout keeps")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB (H100: 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--paper-table", action="store_true", help="the README table of the paper's configurations")
    p.set_defaults(func=cmd_plan)

    conf = sub.add_parser("config", help="inspect the configuration tree").add_subparsers(dest="cmd", required=True)
    p = conf.add_parser("show", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)
    p = conf.add_parser("doc", help="print every config key with its meaning (markdown)")
    p.add_argument("--readme", action="store_true", help="rewrite the README's config reference")
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

"""The ``moslim`` command line. Thin: parse, build from config, run.

    moslim demo [--algo rloo|ppo|online_dpo] [--seed N] [--quick] --out DIR
    moslim compare [--methods moslim,morlhf,rsoup,dpa] [--quick] [--seeds LIST] --out DIR [a.b=value ...]
    moslim world build --out DIR [--config FILE] [a.b=value ...]
    moslim sft train --data FILE --out DIR [--config FILE] [a.b=value ...]
    moslim policy train --config FILE --out DIR [--prompts FILE] [a.b=value ...]
    moslim eval controllability --policy DIR [--reference DIR] --out DIR
    moslim eval bench --suite mtbench|halueval|hackaprompt|rewardbench --data SRC
                      [--policy DIR] [--rm DIR] [--judge SPEC] --out DIR [bench.x=value ...]
    moslim serve --model DIR [--host H] [--port P] [--name NAME] [--max-tokens-limit N] [--max-body-bytes N]
    moslim rm train [--config FILE] [a.b=value ...] --out DIR
    moslim rm eval --rm DIR --data FILE --json OUT
    moslim rm score --rm DIR --prompt TEXT --response TEXT
    moslim data build-rm --ultrafeedback SRC --ultrasafety SRC --datatype 1|2|3|4 --out DIR
    moslim data build-prompts --hh-rlhf SRC --n N [--exclude FILE] [--seed S] --out DIR
    moslim config show [--config FILE] [a.b=value ...]
    moslim config doc
    moslim export hf --ckpt DIR --out DIR [--model NAME]
    moslim convert hf-to-megatron --hf DIR --out DIR [--tp T] [--pp P] [--ep E] [--etp N] [--vpp V] [--dtype auto|fp32|bf16|fp16]
    moslim convert megatron-to-hf --ckpt DIR --out DIR [--max-shard-gb G]
    moslim plan --model qwen2-0.5b|qwen2-7b|qwen2-57b-a14b|qwen2-72b|PATH --nodes N --gpus-per-node G --tp T --dp D [--pp P [--pp-schedule S] [--microbatches M]] [--stage rm|sft|ppo] [--logprob-chunk C]
    moslim plan --backend megatron --model M --nodes N --gpus-per-node G --tp T [--pp P] [--ep E [--etp T]] [--stage rm|sft]
    moslim plan --paper-table [--backend megatron]
    moslim profile RUN_DIR... [--out DIR]
    moslim launch slurm [--dry-run] [--nodes N --gpus-per-node G --partition P ...] -- STAGE ARGS...
    moslim launch slurm [--dry-run] [options] pipeline --recipe FILE [--force]
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
    from .parallel.dist import is_main  # lazily: torch.distributed is not needed to parse arguments

    return is_main()


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

    slices = {}
    for item in args.slice:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--slice {item!r}: expected NAME=PATH, e.g. ood=data/rm_eval_ood.jsonl")
        slices[name] = path
    report = evaluate_rm_dir(args.rm, args.data, mapping_overrides=args.overrides, slices=slices)
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

    if args.seeds:
        from .demo import run_demo_seeds
        from .eval.seeds import parse_seeds

        summary = run_demo_seeds(args.algo, parse_seeds(args.seeds), args.quick, args.overrides, args.out)
        return 0 if summary["meets_bar"] == summary["num_seeds"] else 1
    cfg = demo_config(args.algo, args.seed, args.quick, args.overrides)
    run_demo(cfg, args.out)
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_config, run_compare

    if args.seeds:
        from .compare import run_compare_seeds
        from .eval.seeds import parse_seeds

        run_compare_seeds(parse_seeds(args.seeds), args.quick, args.overrides, args.out, args.methods or None)
        return 0
    cfg = compare_config(args.quick, args.overrides)
    run_compare(cfg, args.out, args.methods or None)
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


def cmd_export_hf(args) -> int:
    from .checkpoint.export import export_hf

    summary = export_hf(args.ckpt, args.out, args.model)
    print(f"exported {summary['kind']} model {summary['model']!r} of {summary['checkpoint']} "
          f"(step {summary['step']}) to {summary['out']}")
    return 0


def cmd_convert_hf_to_megatron(args) -> int:
    from .engine.megatron.convert import hf_to_megatron
    from .engine.megatron.dims import Layout

    summary = hf_to_megatron(args.hf, args.out, Layout(args.tp, args.pp, args.ep, args.etp, args.vpp), args.dtype)
    print(f"converted {summary['kind']} ({summary['arch']}, {summary['tensors']} HF tensors, vocabulary "
          f"{summary['vocab_size']} padded to {summary['padded_vocab_size']}, checked for layout "
          f"{summary['layout']}) to {summary['out']}")
    return 0


def cmd_convert_megatron_to_hf(args) -> int:
    from .engine.megatron import MegatronNotInstalled
    from .engine.megatron.convert import megatron_to_hf

    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb {args.max_shard_gb}: expected > 0")
    try:
        summary = megatron_to_hf(args.ckpt, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except MegatronNotInstalled as e:  # the reader is megatron-core's own loader
        print(f"moslim: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {summary['kind']} ({summary['arch']}, {summary['tensors']} HF tensors) to {summary['out']}")
    return 0


def cmd_eval_bench(args) -> int:
    from .bench.run import headline, run_bench

    cfg = load_config(args.config, args.overrides)
    report = run_bench(args.suite, args.data, args.out, cfg, policy_dir=args.policy, rm_dir=args.rm,
                       judge_spec=args.judge)
    print(headline(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_serve(args) -> int:
    from .serve.openai_server import serve

    return serve(args.model, args.host, args.port, args.name, args.max_tokens_limit, args.max_body_bytes)


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()  # save_to_disk's per-split bars drown the summary


def cmd_data_build_rm(args) -> int:
    from .data.ultra import build_rm_data

    _quiet_datasets()
    stats = build_rm_data(args.out, args.datatype, args.ultrafeedback, args.ultrasafety,
                          args.val_fraction, args.seed, args.split)
    for name, split in stats["splits"].items():
        hist = "  ".join(f"{h} {v['classes']} masked {v['masked']}" for h, v in split["histograms"].items())
        print(f"{name:10s} {split['records']:7d} records {split['prompts']:6d} prompts  {hist}")
    print(f"dropped {len(stats['dropped'])} ({stats['drop_reasons']}); {len(stats['masked_heads'])} kept with one "
          f"head masked for a bad rating; details in {Path(args.out) / 'stats.json'}")
    print(f"train with: {stats['train_command']}")
    return 0


def cmd_data_build_prompts(args) -> int:
    from .data.prompts import build_policy_prompts
    from .prefs import PreferenceSpec

    _quiet_datasets()
    stats = build_policy_prompts(args.hh_rlhf, args.out, args.n, PreferenceSpec.datatype(args.datatype),
                                 args.seed, args.exclude, args.split)
    print(f"wrote {stats['written']} prompts ({stats['multi_turn']} multi-turn) from a pool of {stats['pool']} "
          f"to {Path(args.out) / 'policy_train.jsonl'}; dropped {len(stats['dropped'])}")
    if "warning" in stats:
        print(f"warning: {stats['warning']}", file=sys.stderr)
    return 0


def cmd_config_show(args) -> int:
    import yaml

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_plan(args) -> int:
    from .parallel.planner import format_plan, megatron_table, paper_table, plan, plan_json

    if args.paper_table:
        print((megatron_table if args.backend == "megatron" else paper_table)(args.seq), end="")
        return 0
    if not args.model:
        raise ConfigError("moslim plan needs --model (or --paper-table)")
    dp = args.dp or (args.nodes * args.gpus_per_node) // (args.tp * args.pp)
    p = plan(args.model, args.nodes, args.gpus_per_node, args.tp, dp, args.stage, args.seq, args.micro_batch,
             args.rollout_seqs, args.gpu_gb, args.logprob_chunk, args.pp, args.pp_schedule, args.microbatches,
             args.pp_stages_per_rank, args.backend, args.ep, args.etp)
    print(plan_json(p) if args.json else format_plan(p))
    return 0


def cmd_profile(args) -> int:
    from .eval.profile_report import write_profile_report

    md, png, text = write_profile_report(args.run_dirs, args.out or args.run_dirs[0])
    print(text)
    print(f"report: {md}\nplot: {png}")
    return 0


_SLURM_FLAGS = {  # option → (launch.slurm field, type)
    "nodes": int, "gpus_per_node": int, "nproc_per_node": int, "cpus_per_task": int, "partition": str,
    "account": str, "time": str, "qos": str, "job_name": str, "container_image": str, "container_mounts": str,
    "python": str, "port": int, "signal_seconds": int, "max_requeues": int, "dependency": str,
}


def cmd_launch_slurm(args) -> int:
    from .launch.slurm import LaunchError, launch_pipeline, launch_stage

    flags = {k: getattr(args, k) for k in _SLURM_FLAGS if getattr(args, k) is not None}
    if args.setup is not None:
        flags["setup"] = tuple(args.setup)
    rest = list(args.stage)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if rest[:1] == ["pipeline"]:
        pp = argparse.ArgumentParser(prog="moslim launch slurm pipeline")
        pp.add_argument("--recipe", required=True, help="pipeline recipe YAML (configs/paper/)")
        pp.add_argument("--force", action="store_true", help="submit even if the planner says a stage does not fit")
        pargs = pp.parse_args(rest[1:])
        print(launch_pipeline(pargs.recipe, flags, args.dry_run, pargs.force))
        return 0
    if not rest:
        raise LaunchError("moslim launch slurm: give a stage command after `--` or `pipeline --recipe FILE`")
    print(launch_stage(rest, flags, args.dry_run), end="" if args.dry_run else "\n")
    return 0


def config_doc_markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in field_docs():
        doc = " ".join(doc.split())  # a multi-line docstring would end the table row mid-cell
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
    for name, sub in report.get("slices", {}).items():
        lines += ["", f"slice {name}:", format_rm_report(sub)]
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
    p.add_argument("--slice", action="append", default=[], metavar="NAME=PATH",
                   help="also report on another rated file, e.g. ood=DATA/rm_eval_ood.jsonl (repeatable)")
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
    p.add_argument("--seeds", default="", metavar="LIST",
                   help="run one demo per seed (e.g. 0-9,11) into OUT/seed_N and write OUT/seeds.md "
                        "(mean ± std); exit status 1 unless every seed meets the bar")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="MOSLIM vs MORLHF / Rewarded Soups / DPA on the embedded world")
    p.add_argument("--methods", default="", help="comma-separated subset of moslim,morlhf,rsoup,dpa")
    p.add_argument("--quick", action="store_true", help="a ≤10-minute version")
    p.add_argument("--seeds", default="", metavar="LIST",
                   help="run the comparison once per training seed (run.seed; e.g. 0-2,5; the world stays the "
                        "recipe's) into OUT/seed_N, reusing a seed dir whose report was made with the same config, "
                        "and write OUT/seeds.md and OUT/seeds.json (mean ± std over seeds, wins per method)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    p.set_defaults(func=cmd_compare)

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

    exp = sub.add_parser("export", help="export checkpoints").add_subparsers(dest="cmd", required=True)
    p = exp.add_parser("hf", help="a (sharded) training checkpoint → HF safetensors + config + tokenizer")
    p.add_argument("--ckpt", required=True, help="a checkpoint step_N directory, or a checkpoint root with 'latest'")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="which model of the checkpoint (actor, model, rm); default: the only one")
    p.set_defaults(func=cmd_export_hf)

    conv = sub.add_parser("convert", help="HF ⇄ Megatron checkpoints (megatron-core dist_checkpointing)").add_subparsers(
        dest="cmd", required=True)
    p = conv.add_parser("hf-to-megatron", help="an HF causal LM or RM directory → a Megatron checkpoint directory")
    p.add_argument("--hf", required=True, help="HF model directory (Llama, Qwen2, Qwen2-MoE) or RM directory (rm.json)")
    p.add_argument("--out", required=True, help="Megatron checkpoint directory to create (must be empty)")
    for flag, what in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert")):
        p.add_argument(f"--{flag}", type=int, default=1, help=f"{what} parallel size the layout is checked for")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="tensor dtype in the checkpoint (auto: the HF weights' own)")
    p.set_defaults(func=cmd_convert_hf_to_megatron)
    p = conv.add_parser("megatron-to-hf", help="a Megatron checkpoint directory → an HF model or RM directory")
    p.add_argument("--ckpt", required=True, help="directory written by `moslim convert hf-to-megatron`")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file written")
    p.set_defaults(func=cmd_convert_megatron_to_hf)

    p = ev.add_parser("bench", help="MT-Bench / HaluEval 2.0 / Hackaprompt / RewardBench with a pluggable judge")
    p.add_argument("--suite", required=True, choices=("mtbench", "halueval", "hackaprompt", "rewardbench"))
    p.add_argument("--data", required=True, help="benchmark file or folder (jsonl/json/parquet) or a hub name")
    p.add_argument("--policy", default=None, help="HF policy directory whose answers are judged")
    p.add_argument("--rm", default=None, help="reward model directory (rewardbench; short for --judge rm:DIR)")
    p.add_argument("--judge", default=None, help="openai:URL#MODEL | hf:PATH | rm:DIR")
    p.add_argument("--out", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_eval_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a local HF model (e.g. as a judge)")
    p.add_argument("--model", required=True, help="HF causal LM directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed on the first line)")
    p.add_argument("--name", default=None, help="model name served (default: the directory name)")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (larger: HTTP 400); also capped by the model's context")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (larger: HTTP 413)")
    p.set_defaults(func=cmd_serve)

    data = sub.add_parser("data", help="build training data from public data sets").add_subparsers(
        dest="cmd", required=True)
    p = data.add_parser("build-rm", help="UltraFeedback + UltraSafety → multi-head RM data (Table 5)")
    p.add_argument("--ultrafeedback", default=None, help="file, folder, saved data set or hub name")
    p.add_argument("--ultrasafety", default=None, help="file, folder, saved data set or hub name")
    p.add_argument("--datatype", type=int, required=True, choices=(1, 2, 3, 4), help="paper Table 5 preset")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of prompts held out (split by prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, help="split of a saved DatasetDict or hub data set")
    p.set_defaults(func=cmd_data_build_rm)
    p = data.add_parser("build-prompts", help="hh-rlhf → policy prompts with random preference prefixes")
    p.add_argument("--hh-rlhf", required=True, help="file, folder, saved data set or hub name")
    p.add_argument("--n", type=int, required=True, help="prompts to sample (0 = all)")
    p.add_argument("--exclude", default=None, help="prompts used for SFT (jsonl with prompt, or hh-rlhf rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datatype", type=int, default=4, choices=(1, 2, 3, 4), help="heads and level ranges")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict or hub data set")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data_build_prompts)

    p = sub.add_parser("plan", help="per-GPU memory of a model and layout (meta device, fake process group)")
    p.add_argument("--model", default="", help="qwen2-7b, qwen2-57b-a14b, qwen2-72b or a local HF config directory")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=0, help="0 = nodes × gpus-per-node / (pp × tp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (parallel.pp)")
    p.add_argument("--pp-schedule", default="1f1b", choices=("gpipe", "1f1b", "interleaved_1f1b"),
                   help="pipeline schedule (parallel.pp_schedule)")
    p.add_argument("--microbatches", type=int, default=0, help="micro-batches per pipelined step (0 = pp)")
    p.add_argument("--pp-stages-per-rank", type=int, default=1,
                   help="stages per pp rank for interleaved_1f1b (parallel.pp_stages_per_rank)")
    p.add_argument("--backend", default="torch", choices=("torch", "megatron"),
                   help="training engine to plan (parallel.backend): torch = FSDP2 + DTensor TP, megatron = "
                        "megatron-core tp × pp × ep with the distributed optimizer")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (--backend megatron, MoE models)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (--backend megatron; default tp)")
    p.add_argument("--stage", default="rm", choices=("rm", "sft", "ppo"))
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward")
    p.add_argument("--rollout-seqs", type=int, default=32, help="PPO: sequences whose KV cache the rollout keeps")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB (H100: 80)")
    p.add_argument("--logprob-chunk", type=int, default=None,
                   help="vocabulary rows per chunk of the fused log-prob (default: kernels.logprob_chunk's default)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--paper-table", action="store_true", help="the README table of the paper's configurations "
                   "(with --backend megatron: the 57B-A14B and 72B RMs, FSDP beside megatron layouts)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="report of the stages' profile.json (tokens/s, MFU, device-hours, phases)")
    p.add_argument("run_dirs", nargs="+", help="run directories (searched recursively for profile.json)")
    p.add_argument("--out", default=None, help="where profile_report.md/.png go (default: the first run dir)")
    p.set_defaults(func=cmd_profile)

    launch = sub.add_parser("launch", help="submit stages to a cluster").add_subparsers(dest="cmd", required=True)
    p = launch.add_parser("slurm", help="sbatch a stage (-- STAGE ARGS...) or a pipeline (pipeline --recipe FILE)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) instead of submitting")
    for name, tp in _SLURM_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, default=None,
                       help=f"launch.slurm.{name} (default: the stage config's)")
    p.add_argument("--setup", action="append", default=None,
                   help="shell line run before the job (repeatable; replaces launch.slurm.setup)")
    p.add_argument("stage", nargs=argparse.REMAINDER, help="-- STAGE ARGS... | pipeline --recipe FILE [--force]")
    p.set_defaults(func=cmd_launch_slurm)

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
    from .parallel.dist import exit_process

    exit_process(main())

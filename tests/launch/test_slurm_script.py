"""The sbatch scripts `moslim launch slurm` writes (no cluster needed): options, shell syntax,
the README's dry-run output, recipes and the planner's refusal."""

import subprocess
from pathlib import Path

import pytest
import yaml

from moslim_mega.cli import main
from moslim_mega.config import SlurmConfig
from moslim_mega.launch.slurm import LaunchError, launch_pipeline, load_recipe, render_script

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RM_72B = ["--nodes", "4", "--gpus-per-node", "8", "--", "rm", "train", "--config", "configs/paper/qwen2-7b.yaml",
          "--out", "runs/paper/rm-72b", "run.data_dir=data/rm-datatype4",
          "rm.model.name_or_path=/models/Qwen2-72B-sft", "parallel.tp=8"]


def _dry_run(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.chdir(ROOT)
    assert main(["launch", "slurm", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


def _readme_block(name: str) -> str:
    text = README.read_text()
    block = text.split(f"<!-- slurm-dry-run:{name}:start -->\n", 1)[1].split(f"<!-- slurm-dry-run:{name}:end -->", 1)[0]
    return block.removeprefix("```bash\n").removesuffix("```\n")


def test_script_has_the_cluster_options_and_is_valid_bash(capsys, monkeypatch):
    script = _dry_run(capsys, monkeypatch, "--nodes", "2", "--gpus-per-node", "4", "--partition", "h100",
                      "--account", "proj", "--qos", "high", "--time", "02:00:00", "--signal-seconds", "120",
                      "--max-requeues", "5", "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3",
                      "--container-mounts", "/data:/data", "--setup", "module load cuda",
                      "--", "sft", "train", "--data", "d.jsonl", "--out", "runs/sft")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=h100",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=02:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "module load cuda", 'if [ "$RESTART" -lt 5 ]; then'):
        assert line in [s.strip() for s in script.splitlines()], line
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/data:/data" in script
    assert '--nproc_per_node=4' in script and '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"' in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    body = script.split("\n", 1)[1]  # past the "# sbatch ..." line
    subprocess.run(["bash", "-n"], input=body, text=True, check=True)


def test_stage_config_launch_section_is_the_default(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"launch": {"slurm": {"nodes": 3, "partition": "cfgpart", "max_requeues": 1}}}))
    script = _dry_run(capsys, monkeypatch, "--partition", "flag", "--", "rm", "train", "--config", str(cfg),
                      "--out", str(tmp_path / "rm"))
    assert "#SBATCH --nodes=3" in script and "#SBATCH --partition=flag" in script  # the option wins
    assert 'if [ "$RESTART" -lt 1 ]; then' in script


def test_bad_stage_commands_are_refused(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["launch", "slurm", "--dry-run", "--", "plan", "--model", "qwen2-7b"]) == 2
    assert "not a stage to submit" in capsys.readouterr().err
    assert main(["launch", "slurm", "--dry-run", "--", "rm", "trian", "--out", "x"]) == 2
    assert "not a valid stage command" in capsys.readouterr().err
    assert main(["launch", "slurm", "--dry-run"]) == 2


def test_readme_shows_the_commands_dry_run_output(capsys, monkeypatch):
    assert _readme_block("rm-72b") == _dry_run(capsys, monkeypatch, *RM_72B)
    assert _readme_block("moslim-7b") == _dry_run(capsys, monkeypatch, "pipeline", "--recipe",
                                                  "configs/paper/moslim-7b.yaml")


@pytest.mark.parametrize("recipe", ["moslim-7b", "moslim-rm57b", "moslim-rm72b"])
def test_paper_recipes_chain_stage_output_dirs(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, stages = load_recipe(f"configs/paper/{recipe}.yaml")
    assert [s.name for s in stages] == ["sft", "rm", "policy", "eval"]
    policy = stages[2].argv
    assert f"policy.init={out}/sft/model" in policy and f"policy.rm_dir={out}/rm" in policy
    assert stages[2].argv[stages[2].argv.index("--out") + 1] == f"{out}/policy"
    bash = render_script(stages[3].argv, stages[3].slurm)
    assert f"--policy {out}/policy/policy" in bash


def test_planner_refuses_a_layout_that_does_not_fit_unless_forced(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "big", "out": str(tmp_path / "run"), "slurm": {"gpus_per_node": 8},
                                      "stages": [{"name": "rm", "command": "rm train", "slurm": {"nodes": 1},
                                                  "plan": {"model": "qwen2-72b", "stage": "rm", "tp": 8}}]}))
    with pytest.raises(LaunchError, match="stage rm: the planner says this layout does not fit"):
        launch_pipeline(str(recipe), {}, dry_run=True, force=False)
    text = launch_pipeline(str(recipe), {}, dry_run=True, force=True)
    assert "# plan rm: DOES NOT FIT (qwen2-72b, 1×8 GPUs, tp=8)" in text and "#SBATCH --nodes=1" in text


def test_unknown_recipe_placeholder_names_the_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"name": "rm", "command": "rm train",
                                                  "overrides": ["policy.init={sft}/model"]}]}))
    with pytest.raises(LaunchError, match=r"stages\[0\]: \{sft\} is not an earlier stage"):
        load_recipe(recipe)


def test_slurm_config_bounds():
    from moslim_mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="launch.slurm.nodes: must be >= 1"):
        load_config(None, ["launch.slurm.nodes=0"])
    assert SlurmConfig().signal_seconds == 300

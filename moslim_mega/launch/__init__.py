"""Cluster launch: sbatch scripts for stages and pipelines (``moslim launch slurm``) and the per-node
wrapper that carries preemption signals to every rank (``python -m moslim_mega.launch.node``)."""

"""Slurm launcher: ``python -m launch.slurm`` (see sbatch.py for what it writes)."""

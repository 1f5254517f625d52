"""Sweeps over settings (configs/ablations/*.py): their points, running them, SLURM arrays."""

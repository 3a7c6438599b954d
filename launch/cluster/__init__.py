"""Code shared by the cluster launchers (Slurm, Kubernetes, Cloud TPU VM, local)."""

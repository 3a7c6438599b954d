"""Kubernetes launcher: ``python -m launch.k8s`` (see manifest.py for what it writes)."""

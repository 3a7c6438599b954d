"""Cloud TPU VM launcher: ``python -m launch.tpu`` (see command.py)."""

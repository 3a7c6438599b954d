"""research: a JAX/Flax NNX codebase for training Transformers at scale."""

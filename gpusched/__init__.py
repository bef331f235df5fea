"""gpusched: a daemon that owns a host's GPUs and runs NVIDIA TAO Toolkit work on them."""

__version__ = "0.1.0"

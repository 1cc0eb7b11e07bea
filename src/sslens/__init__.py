"""sslens: train self-supervised image models and explain what their representations look at."""

__version__ = "0.1.0"

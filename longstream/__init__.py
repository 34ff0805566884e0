"""longstream: long, streaming, interactive video generation with AR video diffusion."""

__version__ = "0.1.0"

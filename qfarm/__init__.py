"""qfarm: batch quantization and fine-tuning of language models on Ray, with Redis holding all state."""

__version__ = "0.1.0"

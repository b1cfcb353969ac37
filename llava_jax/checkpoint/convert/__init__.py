"""Checkpoint converters: ``hf`` (transformers), ``llava_original`` and ``big_vision``."""

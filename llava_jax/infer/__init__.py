"""Inference: ``sampler.generate`` (batched, left-padded prompts)."""

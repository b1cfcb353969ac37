"""Data layer: image preprocessing, conversation templates, tokenization with label masks, sources and pipelines."""

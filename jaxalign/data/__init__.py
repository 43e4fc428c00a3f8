"""Data: tokenizers, prompt templates, datasets and input pipelines."""

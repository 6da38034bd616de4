"""A run, outside the training stack: its configuration, its directory, its checkpoints, and loading models.

config      RunConfig and its sections, `--set` overrides, experiment recipes
layout      a run directory's files (config.json as a typed RunRecord, checkpoints, tokenizer copy, URL mirrors)
checkpoint  Orbax checkpoints (state, RNG, data-iterator state): saving, restoring, a reader's partial restore
orbax_errors  Orbax's failures as one line (the logging filters around them)
loading     models for reading or to start from: run directories, Hugging Face folders, GGUF files, hub ids

Imports neither the train step, the optimizer nor Grain (evaluate, generate, export and plan read runs with it).
"""

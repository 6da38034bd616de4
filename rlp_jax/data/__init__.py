"""Text in: the Grain pipeline, its settings, file readers, tokenizers and the generated corpora.

config     DataConfig / SourceConfig (plain settings, no Grain)
pipeline   the streaming mixture, packing, exact resume, bad-record counts (Grain)
stages     our Grain stages: records -> document chunks, the window shuffle, collation
readers    file formats (JSONL, Parquet, text, ArrayRecord; local and gs://)
tokenizer  sentencepiece and Hugging Face / GGUF tokenizers, think markers, embedding growth
corpus     the generated reasoning-rich corpus of the replication and smollm2 recipes
modsum     running sums mod 3: the demo's and the study's reasoning task
"""

"""Text in: the Grain pipeline, file readers, tokenizers and the generated corpus.

pipeline   DataConfig / SourceConfig, the streaming mixture, packing, exact resume, bad-record counts
tokenizer  sentencepiece and Hugging Face / GGUF tokenizers, think markers, embedding growth
corpus     the generated reasoning-rich corpus of the demo and smollm2 recipes
"""

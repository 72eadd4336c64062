"""The engine: paged latent cache blocks, the scheduler (continuous batching, chunked prefill), sampling, the
tokenizer and chat template, and the one generation loop that `core.run` and `core.serve` share."""

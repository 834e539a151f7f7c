"""A Llama-style decoder-only Transformer, its sharding, optimizer and training loop."""

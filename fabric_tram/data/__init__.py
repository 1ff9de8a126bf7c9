"""Data: text corpora per domain, tokenisation, packing, step-exact batching."""

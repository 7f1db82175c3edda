"""The EFT engine: model loading, tokenisation, sampling parameters, request outputs,
paged KV caches, the model runner and the scheduler (docs/DESIGN.md section 5)."""

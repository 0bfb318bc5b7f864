"""Fast paths for the GPU (FlexAttention masks, a fused linear + cross-entropy loss) with plain
PyTorch fallbacks that compute the same function on any device."""

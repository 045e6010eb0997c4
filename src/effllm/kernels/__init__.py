"""Pure tensor functions: attention backends and quantized matmuls, each fast path tested against its reference."""

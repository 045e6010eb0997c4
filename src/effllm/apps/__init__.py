"""Applications built on the engine's public interfaces (a layer above `engine`, beside `serve`)."""

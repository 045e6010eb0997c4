"""Peer engines run beside EffLLM in the benchmarks, each by a standalone script in its own virtualenv.

A peer's script is run with that venv's python (`--peer-python`), reads the same Hugging Face folder the
benchmark measures, and prints one JSON object; it imports nothing of EffLLM. `scripts/peers/` installs
each peer into its own venv (never CI).
"""

"""Structured outputs: constraints on what a request may generate (JSON schema, JSON object, regex,
grammar, choice), enforced by masking the logits each step."""

from effllm.engine.structured.grammar import Grammar
from effllm.engine.structured.manager import BACKENDS, StructuredOutputManager
from effllm.engine.structured.spec import KINDS, StructuredOutputs

__all__ = ["BACKENDS", "KINDS", "Grammar", "StructuredOutputManager", "StructuredOutputs"]

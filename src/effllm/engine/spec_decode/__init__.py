"""Speculative decoding: proposers draft tokens, one target pass verifies them (`verify.py`).

The engine's seam (vLLM V1's "schedule more tokens, take back the rejected ones"): a request's
`draft_token_ids` are scheduled with its last token, `ModelRunner` samples at each of them, and
`Scheduler.update` appends the accepted tokens and rolls `num_computed_tokens` back past the rest.
"""

"""`Scheduler`: which requests compute how many tokens in the next step.

One token budget per step (SARATHI's decode-maximal batching, vLLM V1's scheduler): first every
running request with a single token left (a decode), then the running requests still prefilling, then
waiting requests in arrival order, each taking as much of its prompt as the remaining budget allows
(a chunk). When the KV cache runs out of blocks the lowest-priority request not yet scheduled is
preempted: its blocks are freed and it recomputes later from the front of the waiting queue. No
waiting request is admitted in a step that preempted. First come, first served.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from effllm.engine.block_manager import BlockManager
from effllm.engine.config import EngineConfig
from effllm.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step: requests in the order their tokens are flattened (single-token queries first)."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.budget = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.chunked_prefill = config.enable_chunked_prefill
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the policy
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.budget
        # Running requests: decodes first, then prompts part-way through their prefill.
        queue = deque(sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1))
        # Every decode gets its token before any request's drafts take budget (budget >= max_num_seqs).
        decodes_left = sum(1 for r in queue if r.num_tokens - r.num_computed_tokens == 1)
        while queue and budget > 0:
            request = queue.popleft()
            left = request.num_tokens - request.num_computed_tokens
            if left == 1:
                decodes_left -= 1
            n = min(left + len(request.draft_token_ids), budget - decodes_left if left == 1 else budget)
            del request.draft_token_ids[max(0, n - left) :]  # drafts the budget leaves no room for
            while not self.blocks.allocate(request, n):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.requests.append(request)
                out.num_tokens.append(n)
                budget -= n
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        # Single-token queries (decodes) lead the flattened batch; the sort is stable, so arrival order holds.
        order = sorted(range(len(out.requests)), key=lambda i: out.num_tokens[i] > 1)
        out.requests = [out.requests[i] for i in order]
        out.num_tokens = [out.num_tokens[i] for i in order]
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        held = []  # later samples of an n > 1 request whose first sample is still prefilling
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            leader = request.wait_for
            if leader is not None and not (leader.prefilled or leader.is_finished):
                held.append(self.waiting.popleft())
                continue
            hits = self.blocks.find_cached_prefix(request)
            num_hit_tokens = len(hits) * self.blocks.block_size
            remaining = request.num_tokens - num_hit_tokens
            if remaining > budget and not self.chunked_prefill:
                break
            n = min(remaining, budget)
            if not self.blocks.allocate(request, n, hits):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            self.num_prefix_hit_tokens += num_hit_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(held))
        return budget

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks; it recomputes its tokens (prompt and outputs) when readmitted."""
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.clear_drafts()
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.running.remove(request)
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after the step
    def update(
        self, out: SchedulerOutput, sampled: dict[Request, list[tuple[int, dict[int, float] | None]]]
    ) -> None:
        """Advance the computed tokens, append each request's accepted tokens (checking stop conditions token
        by token), roll back drafts that were computed but not accepted, and finish requests that stop.

        Only then are full blocks offered to the prefix cache, so a block holding an unverified draft token
        is never cached (its slots are overwritten by later steps, never freed early).
        """
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            request.num_computed_tokens += n
            accepted = sampled.get(request)
            stopped = accepted is not None and self._accept(request, accepted)
            self.blocks.cache_computed_blocks(request)
            if stopped:
                self._release(request)

    def _accept(self, request: Request, accepted: list[tuple[int, dict[int, float] | None]]) -> bool:
        """Append accepted tokens up to the first that stops the request; True when one did."""
        num_drafts = len(request.draft_token_ids)
        request.clear_drafts()
        if request.params.scores_prompt_only:  # the prompt is scored; the sampled token is not wanted
            request.num_computed_tokens -= 1
            request.finish("length")
            return True
        appended, stopped = 0, False
        for token, logprobs in accepted:
            request.append_token(token, logprobs)
            appended += 1
            if request.check_stop(self.max_model_len):
                stopped = True
                break
        if num_drafts:
            request.num_draft_tokens += num_drafts
            request.num_accepted_tokens += len(accepted) - 1
        # The step computed the last token and every draft; keys are valid only up to the last accepted draft.
        request.num_computed_tokens -= num_drafts + 1 - appended
        return stopped

    def finish(self, request: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request from outside the policy (a stop string, an abort)."""
        if request.is_finished:
            return
        request.finish(reason, stop_reason)
        self._release(request)

    def _release(self, request: Request) -> None:
        self.blocks.free(request)
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

"""`StepLayout`: one engine step described as tensors and lists, the only thing attention backends read.

The model runner flattens a step's requests into one sequence of T tokens (single-token queries first,
then multi-token chunks: prompt chunks, or a last token followed by draft tokens to verify) and builds
this once per step. Backends never see `Request` objects (nano-vllm's `Context`, vLLM's attention
metadata): a new backend needs only these fields.

    request r's queries are rows query_start_loc[r] .. query_start_loc[r + 1] - 1 of the step;
    they sit at positions num_computed[r] .. seq_lens[r] - 1 and see keys 0 .. their own position;
    position p of request r lives in cache slot block_tables[r][p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    input_ids: torch.Tensor  # [T] long: the step's tokens, flattened
    positions: torch.Tensor  # [T] long: each token's position in its sequence
    slot_mapping: torch.Tensor  # [T] long: the flat KV-cache slot each token's key and value go to
    query_start_loc: list[int]  # [R + 1]: where each request's queries start in the flattened step
    num_computed: list[int]  # [R]: keys cached before this step, per request
    seq_lens: list[int]  # [R]: keys after this step (num_computed + queries)
    block_tables: list[list[int]]  # [R]: each request's KV-cache blocks, from position 0
    sample_rows: list[int]  # rows whose logits are sampled, in request order
    block_size: int

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    def query_lens(self) -> list[int]:
        starts = self.query_start_loc
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]

    @property
    def num_decodes(self) -> int:
        """Leading requests with a single query each (decodes come first in the flattened step)."""
        n = 0
        for length in self.query_lens():
            if length != 1:
                break
            n += 1
        return n

    @property
    def all_decodes(self) -> bool:
        return self.num_tokens == self.num_requests

    def rows_of(self, requests: list[int]) -> list[int]:
        """The flattened rows of the given requests (indices into this layout), in that order."""
        starts = self.query_start_loc
        return [row for r in requests for row in range(starts[r], starts[r + 1])]

    def select(self, requests: list[int]) -> StepLayout:
        """The layout of a subset of this step's requests (in the order given), with nothing sampled: what
        a pass over only some requests' tokens reads (layers that other requests skip)."""
        rows = torch.tensor(self.rows_of(requests), dtype=torch.long, device=self.input_ids.device)
        lens = self.query_lens()
        starts = [0]
        for r in requests:
            starts.append(starts[-1] + lens[r])
        return StepLayout(
            input_ids=self.input_ids[rows],
            positions=self.positions[rows],
            slot_mapping=self.slot_mapping[rows],
            query_start_loc=starts,
            num_computed=[self.num_computed[r] for r in requests],
            seq_lens=[self.seq_lens[r] for r in requests],
            block_tables=[self.block_tables[r] for r in requests],
            sample_rows=[],
            block_size=self.block_size,
        )


def build_step_layout(
    token_ids: list[list[int]],
    num_computed: list[int],
    block_tables: list[list[int]],
    sample_counts: list[int],
    block_size: int,
    device: torch.device,
) -> StepLayout:
    """The layout of requests computing `token_ids[r]` after their `num_computed[r]` cached tokens; the last
    `sample_counts[r]` rows of each request are sampled (0: a prompt chunk that samples nothing)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    sample_rows: list[int] = []
    seq_lens = []
    for tokens, start, blocks, samples in zip(
        token_ids, num_computed, block_tables, sample_counts, strict=True
    ):
        end = start + len(tokens)
        ids += tokens
        positions += range(start, end)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        sample_rows += range(len(ids) - samples, len(ids))
        starts.append(len(ids))
        seq_lens.append(end)
    as_long = dict(dtype=torch.long, device=device)
    return StepLayout(
        input_ids=torch.tensor(ids, **as_long),
        positions=torch.tensor(positions, **as_long),
        slot_mapping=torch.tensor(slots, **as_long),
        query_start_loc=starts,
        num_computed=list(num_computed),
        seq_lens=seq_lens,
        block_tables=block_tables,
        sample_rows=sample_rows,
        block_size=block_size,
    )

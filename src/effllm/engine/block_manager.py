"""`BlockManager`: which KV-cache blocks each request owns, and the prefix cache over them.

The KV cache is cut into blocks of `block_size` token slots (the tensors live in the model runner; here
blocks are just ids). A request's `block_ids` map its token positions to slots: position p lives in
block `block_ids[p // block_size]` at offset `p % block_size`.

Prefix caching: once a block is full and computed it is registered under a chained key, (hash of the
previous block's key, the block's tokens), so a key names the whole prefix up to that block. A later
request with the same prefix takes those blocks instead of computing them (reference counted, never
copied). A block whose count drops to zero joins the free queue but keeps its key, so it can still be
revived; it is evicted only when the queue hands it out again, least recently freed first, unkeyed
blocks before keyed ones and the tail of a chain before its head (as vLLM does).
"""

from __future__ import annotations

from collections import OrderedDict

from effllm.engine.request import Request

BlockKey = tuple[int | None, tuple[int, ...]]


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        cache_outputs: bool = True,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # False: only blocks wholly inside the prompt are cached (SkipDecode leaves the deep layers of
        # generated tokens without keys, which a later request reading them as its prompt would need).
        self.cache_outputs = cache_outputs
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # Free blocks in eviction order (first out first); a dict gives O(1) removal on a cache hit.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _key(self, request: Request, i: int) -> BlockKey:
        """The cache key of the request's i-th full block (hashes of the blocks before it are memoised)."""
        bs, hashes = self.block_size, request.block_hashes
        while len(hashes) < i:
            j = len(hashes)
            hashes.append(
                hash(
                    (
                        hashes[j - 1] if j else request.cache_salt,
                        tuple(request.token_ids[j * bs : (j + 1) * bs]),
                    )
                )
            )
        return (hashes[i - 1] if i else request.cache_salt, tuple(request.token_ids[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens (at least one token is left
        to compute, so that the step that finishes the prompt has a position to sample from)."""
        if not self.enable_prefix_caching or request.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        hits = []
        for i in range((request.num_tokens - 1) // self.block_size):
            block = self.cached.get(self._key(request, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full and computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if not self.cache_outputs:
            full = min(full, request.num_prompt_tokens // self.block_size)
        for i in range(request.num_registered_blocks, full):
            key = self._key(request, i)
            block = request.block_ids[i]
            if key not in self.cached and self.block_keys[block] is None:
                self.cached[key] = block
                self.block_keys[block] = key
        request.num_registered_blocks = max(full, request.num_registered_blocks)

    # ------------------------------------------------------------------ allocation
    def _shortfall(self, request: Request, num_new_tokens: int, cached_blocks: list[int]) -> int:
        num_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        new = self.blocks_needed(num_tokens) - len(request.block_ids) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return max(new, 0) + revived - len(self.free_queue)

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens after its computed ones (and after
        `cached_blocks`, a prefix-cache hit it takes over). All or nothing: False when blocks run out."""
        if self._shortfall(request, num_new_tokens, cached_blocks) > 0:
            return False
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        request.block_ids.extend(cached_blocks)
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_tokens += len(cached_blocks) * self.block_size
        for _ in range(self.blocks_needed(num_tokens) - len(request.block_ids)):
            block, _ = self.free_queue.popitem(last=False)
            key = self.block_keys[block]
            if key is not None:  # evict: the block's old contents are about to be overwritten
                del self.cached[key]
                self.block_keys[block] = None
            self.ref_counts[block] = 1
            request.block_ids.append(block)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so that a chain's head stays cached longest)."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_keys[block] is None:  # nothing worth keeping: reuse it first
                    self.free_queue.move_to_end(block, last=False)
        request.block_ids = []
        request.num_registered_blocks = 0

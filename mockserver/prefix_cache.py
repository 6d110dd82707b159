"""The mock's prefix cache (`mock-server --prefix-cache`): vLLM's automatic prefix caching, modelled.

A prompt, rendered as `mockserver.tokens.TokenModel` renders it (chat: BOS, each message's
role header and text, the generation prompt; completions: BOS and the prompt's tokens), is
cut into blocks of `block_tokens` tokens (vLLM's default block size is 16). Each full block
is named by a hash chained with the previous block's, so a block matches only when the
whole prefix before it matches too. The cache is an LRU of at most `capacity_blocks` blocks.

* Lookup: a request's cached tokens are the longest run of leading full blocks found in the
  cache, times `block_tokens`; at most `(P - 1) // block_tokens` blocks of a P-token prompt,
  since vLLM always computes a prompt's last token (a prompt entirely in the cache gets one
  block less). The blocks found become the most recently used.
* Insert: the prompt's full blocks are cached as the request starts generating (so an
  identical request arriving a moment later already hits them), and when its generation
  ends, the full blocks of prompt + output: the next turn of a conversation, which repeats
  the history and the server's own reply after an assistant header, hits the previous turn's
  prompt and reply (as in vLLM, which caches generated tokens' blocks too). Blocks beyond
  `capacity_blocks` evict the least recently used; a prompt's blocks count as used from
  its last to its first (vLLM frees them in that order), so a chain loses its tail first.

The cached part of a prompt costs no prefill time: the TTFT is `ttft_ms` +
`prefill_ms_per_1k_tokens` x (P - cached) / 1000. Unlike vLLM, blocks in use by running
requests can be evicted (the mock never runs out of KV cache), and with `--workers N` each
worker has its own cache, as data-parallel engines do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

DEFAULT_BLOCK_TOKENS = 16
# The mock's simulated KV cache (`metrics.KV_CACHE_CAPACITY_TOKENS`) in 16-token blocks.
DEFAULT_CAPACITY_BLOCKS = 16_384


def block_hashes(items: Sequence[Hashable], block_tokens: int, start_block: int = 0, parent: int = 0) -> list[int]:
    """The chained hashes of the full blocks of `items` from block `start_block` on, the first
    of them chained to `parent` (the hash of block `start_block - 1`, 0 for none)."""
    out: list[int] = []
    for start in range(start_block * block_tokens, len(items) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(items[start : start + block_tokens])))
        out.append(parent)
    return out


class PrefixCache:
    """An LRU of block hashes, with the counters `/metrics` exposes (in tokens, as vLLM v1).

    `queried_tokens`: prompt tokens of every request looked up (vLLM's
    `prefix_cache_queries`); `hit_tokens`: those found cached (`prefix_cache_hits`);
    `last_hit_rate`: cached / prompt tokens of the latest lookup (SGLang's `cache_hit_rate`,
    which is the rate of the latest prefill batch: each request is its own here).
    """

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS):
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.last_hit_rate = 0.0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """Cached tokens of a prompt of `prompt_tokens` tokens whose full blocks are `hashes`."""
        limit = max(0, (prompt_tokens - 1) // self.block_tokens)
        found = 0
        for h in hashes[:limit]:
            if h not in self._blocks:
                break
            found += 1
        for h in reversed(hashes[:found]):
            self._blocks.move_to_end(h)
        cached = found * self.block_tokens
        self.queried_tokens += prompt_tokens
        self.hit_tokens += cached
        self.last_hit_rate = cached / prompt_tokens if prompt_tokens else 0.0
        return cached

    def insert(self, hashes: Sequence[int]) -> None:
        """Cache the blocks, evicting the least recently used.

        A prompt's blocks are used last to first (as vLLM frees them), so the tail of a chain
        is evicted before its head, and a cached prefix shortens rather than breaks."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

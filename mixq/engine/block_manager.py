"""Paged KV-cache block allocation with prefix caching (plain Python, no torch).

A sequence's block table grows as its tokens do; blocks are counted by reference, so a
block holding a prompt prefix can sit in several tables at once.

Prefix caching (SGLang's radix cache, vLLM's automatic prefix caching) at block
granularity: once every token of a full block has its K/V written (the step that computed
it is over), the block is registered under its content, the pair (content id of the
block before it, its block_size token ids). A content id names one chain of tokens from
the start of a sequence; it is handed out when that chain is first registered, so a key
is exact (no hash that two different prefixes could share). A new sequence walks its
prompt block by block through the registered keys and starts with the blocks it finds,
their tokens already computed.

- Only full blocks that are completely written are registered, and a sequence never
  writes into a block it got from the cache: the match stops one token short of the
  prompt (the last prompt token must be computed for its logits), so the first position
  it computes opens a block of its own.
- A block whose reference count drops to 0 keeps its registered content and waits,
  least recently released first, to be evicted when no never-used block is left
  (evictable blocks count as free). A sequence's blocks are released tail first, so its
  prefix outlives its private tail.
- Aborts and preemptions release references, never blocks another table still holds.
- Two sequences that compute the same block at once (both started before either
  registered it) keep their own copies; the second is not registered (it gets the
  first's content id, so its later blocks still chain) and is freed as a plain block.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from mixq.engine.sequence import Sequence

ROOT = 0  # content id of the empty prefix


class BlockManager:
    """num_blocks blocks of block_size tokens; enable_caching turns prefix caching on."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks  # its key in `cached` while registered
        self.cid = [ROOT] * num_blocks  # content id of the chain ending with this block (0: none)
        self.cached: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent cid, tokens) -> block
        self.never_used: deque[int] = deque(range(num_blocks))  # free, holding nothing worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, registered; LRU first
        self._next_cid = ROOT + 1
        self.num_evicted = 0  # registered blocks whose content was dropped to make room

    # -- counts ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks a table can take now (evicting cached content if need be)."""
        return len(self.never_used) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (held or evictable)."""
        return len(self.cached)

    # -- prefix matching ------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The registered blocks that hold seq's leading tokens, in order (no side effects).
        Stops one token short of seq's tokens, so at least one token is left to compute."""
        if not self.enable_caching:
            return []
        bs, tokens = self.block_size, seq.token_ids
        out: list[int] = []
        parent = ROOT
        for i in range((len(tokens) - 1) // bs):
            b = self.cached.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if b is None:
                break
            out.append(b)
            parent = self.cid[b]
        return out

    def can_allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether seq (holding no blocks) can start with the cached `hits` and room for
        num_tokens tokens. Hits nobody holds leave the free count when taken."""
        revived = sum(1 for b in hits if self.ref[b] == 0)
        need = max(0, -(-num_tokens // self.block_size) - len(hits))
        return need + revived <= self.num_free

    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Start seq's table with the cached `hits` (their tokens count as computed) and
        grow it to num_tokens tokens (caller checked can_allocate)."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        for b in hits:  # first, so that growing the table cannot evict them
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        seq.block_table = list(hits)
        seq.num_cached_blocks = len(hits)
        seq.num_computed = len(hits) * self.block_size
        self.reserve(seq, num_tokens)

    # -- growing and releasing ------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so its table holds `num_tokens` tokens."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens (caller checked can_reserve)."""
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: {seq!r} needs {n}, {self.num_free} free")
        seq.block_table.extend(self.take(n))

    def take(self, n: int) -> list[int]:
        """n blocks for the caller alone (reference 1): never-used ones first, then the
        least recently released cached ones, whose content is forgotten."""
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: {n} wanted, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.never_used:
                b = self.never_used.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.key[b]]
                self.num_evicted += 1
                self.key[b] = None
                self.cid[b] = ROOT
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, last first; a block nobody holds becomes
        free (evictable if registered, so its content can still be matched)."""
        for b in reversed(blocks):
            if self.ref[b] < 1:
                raise RuntimeError(f"KV block {b} released more often than taken")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.key[b] is not None:
                    self.evictable[b] = None  # most recently released: evicted last
                else:
                    self.cid[b] = ROOT
                    self.never_used.append(b)

    def free(self, seq: Sequence) -> None:
        """Release seq's whole table (finish, abort, preemption)."""
        self.release(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0

    # -- registering computed blocks --------------------------------------------------

    def cache_computed(self, seq: Sequence) -> None:
        """Register seq's blocks that became full and written since the last call: those
        wholly below seq.num_computed. Call after each step that advanced seq."""
        if not self.enable_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        if full <= seq.num_cached_blocks:
            return
        tokens, table = seq.token_ids, seq.block_table
        for i in range(seq.num_cached_blocks, full):
            b = table[i]
            k = (self.cid[table[i - 1]] if i else ROOT, tuple(tokens[i * bs : (i + 1) * bs]))
            same = self.cached.get(k)
            if same is None:
                self.cached[k] = b
                self.key[b] = k
                self.cid[b] = self._next_cid
                self._next_cid += 1
            else:  # computed twice at once: keep ours private, chain on the registered content
                self.cid[b] = self.cid[same]
        seq.num_cached_blocks = full

"""Prefix caching: full KV pages of identical token prefixes shared across sequences.

A full page is named by a hash chain over token blocks: block b of a sequence hashes
(hash of block b-1, an optional extra key, the block's page_size token ids) with SHA-256, so equal
hashes mean equal tokens from position 0 up to the end of the block (and the same extra key, e.g. an
adapter name or a tenant salt). The hash is stable across processes (no Python `hash`). Only FULL
pages whose K/V have been computed are cached; a partial last page is always private.

`PrefixCache` also is the allocator the scheduler uses: it hands out free pages first and, when
those run out, evicts the least recently released idle cached page (reference count 0) — never a
page someone holds. Sequences release their pages last-to-first, so a chain's tail is evicted
before its head (a head evicted first would leave its tail unreachable).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxinfer.engine.pages import PagePool, PagePoolError

ROOT_HASH = hashlib.sha256(b"jaxinfer.engine.prefix_cache/root/v1").digest()
"""The parent hash of a sequence's first block."""


def block_hash(parent: bytes, tokens: Sequence[int], extra_key: bytes = b"") -> bytes:
    """SHA-256 of (parent hash, length-tagged extra key, token ids as little-endian int64)."""
    h = hashlib.sha256(parent)
    h.update(len(extra_key).to_bytes(8, "little"))
    h.update(extra_key)
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], page_size: int,
                        extra_key: bytes = b"") -> None:
    """Append to `hashes` the chain hashes of every full block of `token_ids` it lacks."""
    for b in range(len(hashes), len(token_ids) // page_size):
        parent = hashes[b - 1] if b else ROOT_HASH
        hashes.append(block_hash(parent, token_ids[b * page_size:(b + 1) * page_size], extra_key))


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of a `PrefixCache` since it was made."""

    queries: int
    """Prefix lookups committed (one per admitted sequence with nothing computed yet)."""
    hit_tokens: int
    """Tokens whose K/V were reused from cached pages instead of computed."""
    hit_pages: int
    """Cached pages reused (hit_tokens / page_size)."""
    inserted_pages: int
    """Pages registered in the cache (full pages whose K/V were computed)."""
    cached_pages: int
    """Pages in the cache now, held or idle."""
    idle_pages: int
    """Cached pages nobody holds now (the eviction candidates)."""
    evictions: int
    """Idle cached pages dropped from the cache to make room for new allocations."""


class PrefixCache:
    """Hash -> page map over a `PagePool`, with LRU eviction of idle cached pages."""

    def __init__(self, pool: PagePool, page_size: int):
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.pool = pool
        self.page_size = page_size
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._queries = self._hit_pages = self._inserted = self._evictions = 0

    @property
    def num_available(self) -> int:
        """Pages an allocation may get: free ones plus idle cached ones (evicted on demand)."""
        return self.pool.num_free + len(self._lru)

    def idle_pages(self) -> list[int]:
        """Idle cached pages, least recently released first (the eviction order)."""
        return list(self._lru)

    def is_cached(self, page: int) -> bool:
        """Whether `page` is registered under some block hash."""
        return page in self._hash_of

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages of the longest cached prefix of the chain `hashes` (no side effects)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_idle(self, pages: Sequence[int]) -> int:
        """How many of `pages` are idle (claiming them takes them out of `num_available`)."""
        return sum(page in self._lru for page in pages)

    def claim(self, pages: Sequence[int]) -> None:
        """Commit one lookup whose hit is `pages` (from `match`): hold each, count the query."""
        for page in pages:
            if page not in self._hash_of:
                raise PagePoolError(f"claim of page {page}, which is not in the prefix cache")
            self._lru.pop(page, None)
            self.pool.incref(page)
        self._queries += 1
        self._hit_pages += len(pages)

    def insert(self, h: bytes, page: int) -> bool:
        """Register held, computed, full `page` under hash `h`; False when `h` is already cached.

        A second page with the same tokens (two sequences computed the block at the same time)
        stays private and returns to the free list when released.
        """
        if self.pool.refcount(page) == 0:
            raise PagePoolError(f"insert of page {page}, which nobody holds")
        if h in self._page_of:
            return False
        if page in self._hash_of:
            raise PagePoolError(f"page {page} is already cached under another block hash")
        self._page_of[h] = page
        self._hash_of[page] = h
        self._inserted += 1
        return True

    def allocate(self, n: int) -> list[int]:
        """`n` pages held once each: free pages first, then evicted idle cached pages (LRU)."""
        if n > self.num_available:
            raise PagePoolError(
                f"cannot allocate {n} pages: {self.pool.num_free} free and {len(self._lru)} "
                f"evictable of {self.pool.num_pages}")
        while self.pool.num_free < n:
            self._evict_oldest()
        return self.pool.allocate(n)

    def release(self, pages: Sequence[int]) -> None:
        """Let go of a sequence's `pages`, last to first; idle cached ones become evictable."""
        for page in reversed(pages):
            if not self.pool.decref(page):
                continue
            if page in self._hash_of:
                self._lru[page] = None
            else:
                self.pool.reclaim(page)

    def clear(self) -> int:
        """Evict every idle cached page (held ones stay); returns how many were evicted."""
        n = len(self._lru)
        while self._lru:
            self._evict_oldest()
        return n

    def stats(self) -> PrefixCacheStats:
        """A snapshot of the counters."""
        return PrefixCacheStats(
            queries=self._queries, hit_tokens=self._hit_pages * self.page_size,
            hit_pages=self._hit_pages, inserted_pages=self._inserted,
            cached_pages=len(self._hash_of), idle_pages=len(self._lru), evictions=self._evictions)

    def _evict_oldest(self) -> None:
        page, _ = self._lru.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
        self.pool.reclaim(page)
        self._evictions += 1

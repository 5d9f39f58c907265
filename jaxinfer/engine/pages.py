"""A fixed pool of KV-cache pages with reference counts, and page-table rows for the device.

Every page is in exactly one of three states:

- free: on the free list, reference count 0, holds nothing anyone may read;
- held: reference count >= 1 (one count per sequence whose page table lists it);
- idle: reference count 0 but kept off the free list by its owner (the prefix cache keeps
  full, computed pages there so a later prompt with the same prefix can reuse them); the owner
  returns it with `reclaim` when it evicts it.

`PagePool` only keeps this accounting; which token goes to which page is the scheduler's business.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

_FREE, _HELD, _IDLE = "free", "held", "idle"


class PagePoolError(ValueError):
    """A page-accounting mistake: over-allocation, double free, an unknown page id."""


class PagePool:
    """`num_pages` pages with ids 0..num_pages-1, a FIFO free list and per-page reference counts."""

    def __init__(self, num_pages: int):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise PagePoolError(f"num_pages must be an int >= 1, got {num_pages!r}")
        self.num_pages = num_pages
        self._refcount = np.zeros(num_pages, np.int64)
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._is_free = np.ones(num_pages, bool)

    @property
    def num_free(self) -> int:
        """Pages on the free list (idle pages of the prefix cache are not counted)."""
        return len(self._free)

    def refcount(self, page: int) -> int:
        """How many sequences hold `page`."""
        self._check_id(page)
        return int(self._refcount[page])

    def state(self, page: int) -> str:
        """'free', 'held' or 'idle' (see the module docstring)."""
        self._check_id(page)
        if self._is_free[page]:
            return _FREE
        return _HELD if self._refcount[page] > 0 else _IDLE

    def allocate(self, n: int) -> list[int]:
        """Take `n` pages off the free list (oldest-freed first), each with reference count 1."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PagePoolError(f"allocate(n): n must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise PagePoolError(
                f"cannot allocate {n} pages: only {len(self._free)} of {self.num_pages} are free")
        pages = [self._free.popleft() for _ in range(n)]
        self._is_free[pages] = False
        self._refcount[pages] = 1
        return pages

    def incref(self, page: int) -> None:
        """One more sequence holds `page` (held or idle; a free page holds nothing to share)."""
        self._check_id(page)
        if self._is_free[page]:
            raise PagePoolError(f"incref of page {page}, which is free (allocate it first)")
        self._refcount[page] += 1

    def decref(self, page: int) -> bool:
        """One sequence lets go of `page`; True when nobody holds it any more (it is then idle)."""
        self._check_id(page)
        if self._refcount[page] == 0:
            raise PagePoolError(
                f"double free of page {page}: its reference count is already 0 "
                f"({self.state(page)})")
        self._refcount[page] -= 1
        return bool(self._refcount[page] == 0)

    def reclaim(self, page: int) -> None:
        """Put an idle page (reference count 0, not free) back on the free list."""
        self._check_id(page)
        if self._is_free[page]:
            raise PagePoolError(f"double free of page {page}: it is already on the free list")
        if self._refcount[page] != 0:
            raise PagePoolError(
                f"cannot reclaim page {page}: {int(self._refcount[page])} sequence(s) still "
                f"hold it")
        self._is_free[page] = True
        self._free.append(page)

    def free(self, pages: Sequence[int]) -> None:
        """Release one reference to each of `pages`; those nobody holds go back to the free list."""
        for page in pages:
            if self.decref(page):
                self.reclaim(page)

    def _check_id(self, page: int) -> None:
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)) or not (
                0 <= page < self.num_pages):
            raise PagePoolError(f"page id must be an int in [0, {self.num_pages}), got {page!r}")


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` tokens (ceil division)."""
    return -(-num_tokens // page_size)


def _check_row(num_seq_pages: int, pages_per_seq: int) -> None:
    if num_seq_pages > pages_per_seq:
        raise PagePoolError(
            f"a sequence with {num_seq_pages} pages does not fit a page-table row of "
            f"pages_per_seq={pages_per_seq}")


def page_table_row(pages: Sequence[int], pages_per_seq: int) -> np.ndarray:
    """One sequence's pages, in order, as an int32 row of `pages_per_seq` entries padded with 0.

    Entries past the sequence's pages are never read (the kernel reads ceil(kv_len / page_size)
    pages), so 0 is only a placeholder id.
    """
    _check_row(len(pages), pages_per_seq)
    row = np.zeros(pages_per_seq, np.int32)
    row[:len(pages)] = pages
    return row


def build_page_table(seq_pages: Sequence[Sequence[int]], num_slots: int,
                     pages_per_seq: int) -> np.ndarray:
    """int32 [num_slots, pages_per_seq]: row i is `page_table_row(seq_pages[i])`, then zero rows."""
    if len(seq_pages) > num_slots:
        raise PagePoolError(
            f"{len(seq_pages)} sequences do not fit a page table of num_slots={num_slots}")
    table = np.zeros((num_slots, pages_per_seq), np.int32)
    for i, pages in enumerate(seq_pages):
        _check_row(len(pages), pages_per_seq)
        table[i, :len(pages)] = pages
    return table

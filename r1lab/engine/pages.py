"""Host-side bookkeeping of the paged latent cache: free pages, who holds each page, and the prefix cache.

The cache is one pool of pages of PAGE positions per layer (PagedAttention's blocks, applied to MLA's latent as
FlashMLA does with 64-token pages). A sequence holds a list of pages, its block table. Pages are reference
counted: the n samples of a prompt hold its full pages together. Page 0 is never handed out: idle slots and
unused block-table entries point at it, so their junk writes land there.

Prefix cache (vLLM's automatic prefix caching): a full page is named by a hash of its tokens and of every
token before it (a chain over the pages). When its last holder lets go, a named page is not freed but kept,
least recently released first in line for reuse, so a later prompt with the same prefix (a shared system
prompt, the next turn of a chat, a preempted sequence coming back) takes the page instead of recomputing it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

PAGE = 64  # positions per page (FlashMLA's block size; a multiple of the decode kernel's 64-slot block)


def page_hashes(tokens: list[int], pages: int) -> list[bytes]:
    """Chain hashes of the first `pages` full pages of `tokens`: hash i names tokens[: (i+1) * PAGE]."""
    out, parent = [], b""
    for i in range(pages):
        h = hashlib.blake2b(parent + array("q", tokens[i * PAGE:(i + 1) * PAGE]).tobytes(), digest_size=16)
        parent = h.digest()
        out.append(parent)
    return out


class PagePool:
    """Free list, reference counts and the prefix cache of `num_pages` pages (page 0 reserved)."""

    def __init__(self, num_pages: int, prefix_cache: bool = True):
        self.num_pages = num_pages
        self.prefix_cache = prefix_cache
        self.free: deque[int] = deque(range(1, num_pages))
        self.ref = [0] * num_pages
        self.name: dict[int, bytes] = {}  # page -> its hash (cached pages only)
        self.by_name: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # named pages nobody holds, least recently used first

    def available(self) -> int:
        """Pages that `take` can hand out now: free ones and cached ones nobody holds (evicted on demand)."""
        return len(self.free) + len(self.idle)

    def used(self) -> int:
        return self.num_pages - 1 - self.available()

    def take(self, n: int) -> list[int]:
        """n pages for a new holder: free pages first, then the least recently used cached ones."""
        if n > self.available():
            raise RuntimeError(f"asked for {n} pages with {self.available()} available")
        out = []
        for _ in range(n):
            if self.free:
                p = self.free.popleft()
            else:
                p, _ = self.idle.popitem(last=False)
                del self.by_name[self.name.pop(p)]
            self.ref[p] = 1
            out.append(p)
        return out

    def hold(self, pages: list[int]) -> None:
        """Another holder of pages already in use or in the prefix cache."""
        for p in pages:
            if self.ref[p] == 0:
                del self.idle[p]
            self.ref[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self.ref[p] -= 1
            assert self.ref[p] >= 0, f"page {p} released more often than held"
            if self.ref[p] == 0:
                if p in self.name:
                    self.idle[p] = None  # most recently used: last in line for eviction
                else:
                    self.free.append(p)

    def lookup(self, names: list[bytes]) -> list[int]:
        """The cached pages of the longest run of leading names found (hits; not yet held)."""
        out = []
        if self.prefix_cache:
            for h in names:
                p = self.by_name.get(h)
                if p is None:
                    break
                out.append(p)
        return out

    def forget(self) -> None:
        """Empty the prefix cache (the latents were computed with weights that have changed): cached pages nobody
        holds are freed, held ones lose their names and are freed when released."""
        self.free.extend(self.idle)
        self.idle.clear()
        self.name.clear()
        self.by_name.clear()

    def register(self, pages: list[int], names: list[bytes]) -> None:
        """Name full pages (their content is final) so later prompts can find them. A name already taken by
        another page keeps that page; this one is then freed normally when released."""
        if not self.prefix_cache:
            return
        for p, h in zip(pages, names):
            if p not in self.name and h not in self.by_name:
                self.name[p], self.by_name[h] = h, p

"""The n-gram pool of lookahead decoding, and n-gram guesses for Jacobi blocks.

Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding") collects n-grams from the Jacobi
trajectory and keeps them in a pool keyed by their first token; each step
verifies the n-grams whose first token is the last committed token.

:class:`NGramPool` is that pool: a key maps to at most ``per_key`` n-gram
continuations (the n - 1 tokens after the key), most recently inserted first;
the whole pool holds at most ``capacity`` n-grams. Inserting an n-gram that is
already present refreshes it. When a key is full its oldest continuation is
evicted; when the pool is full the globally oldest one is (least recently
inserted, LRU).

>>> pool = NGramPool(per_key=2, capacity=3)
>>> pool.add((5, 1, 2)); pool.add((5, 3, 4)); pool.add((7, 8, 9))
>>> pool.lookup(5)
[(3, 4), (1, 2)]
>>> pool.add((5, 6, 6))          # key 5 is full: (1, 2) is evicted
>>> pool.lookup(5)
[(6, 6), (3, 4)]
>>> pool.add((9, 9, 9))          # pool is full: the least recently inserted, (5, 3, 4), goes
>>> pool.lookup(5), len(pool)
([(6, 6)], 3)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence


class NGramPool:
    """Bounded pool of n-grams keyed by their first token (LRU eviction)."""

    def __init__(self, per_key: int = 8, capacity: int = 4096):
        if per_key < 1 or capacity < 1:
            raise ValueError("per_key and capacity must be ≥ 1")
        self.per_key = per_key
        self.capacity = capacity
        self._by_key: dict[int, OrderedDict[tuple[int, ...], None]] = {}   # key -> continuations, oldest first
        self._order: OrderedDict[tuple[int, tuple[int, ...]], None] = OrderedDict()  # (key, cont), oldest first

    def __len__(self) -> int:
        return len(self._order)

    def add(self, ngram: Sequence[int]) -> None:
        """Insert (or refresh) ``ngram`` = (key, continuation...), evicting as needed."""
        if len(ngram) < 2:
            raise ValueError("an n-gram needs a key and at least one continuation token")
        key, cont = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        conts = self._by_key.setdefault(key, OrderedDict())
        if cont in conts:                                   # refresh: most recent again
            conts.move_to_end(cont)
            self._order.move_to_end((key, cont))
            return
        if len(conts) >= self.per_key:
            self._remove(key, next(iter(conts)))
        elif len(self._order) >= self.capacity:
            self._remove(*next(iter(self._order)))
        self._by_key.setdefault(key, OrderedDict())[cont] = None   # (an eviction may have dropped the key)
        self._order[(key, cont)] = None

    def extend(self, ngrams: Iterable[Sequence[int]]) -> None:
        for g in ngrams:
            self.add(g)

    def lookup(self, key: int, limit: int | None = None) -> list[tuple[int, ...]]:
        """Continuations of ``key``, most recent first (at most ``limit``)."""
        conts = self._by_key.get(int(key))
        if not conts:
            return []
        out = list(reversed(conts))
        return out if limit is None else out[:limit]

    def _remove(self, key: int, cont: tuple[int, ...]) -> None:
        del self._by_key[key][cont]
        if not self._by_key[key]:
            del self._by_key[key]
        del self._order[(key, cont)]


def ngrams_of(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """All n-grams of a token sequence, in order.

    >>> ngrams_of([1, 2, 3, 4], 3)
    [(1, 2, 3), (2, 3, 4)]
    """
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def lookup_continuation(context: Sequence[int], k: int, max_match: int = 2) -> list[int]:
    """Guess ``k`` tokens after ``context`` by copying what followed an earlier occurrence of its tail.

    Tries the last ``max_match`` tokens first, then shorter suffixes down to
    one token, taking the most recent earlier match (prompt lookup, Saxena
    2023); returns fewer than ``k`` tokens (possibly none) when the match is
    near the end or nothing matches.

    >>> lookup_continuation([4, 5, 6, 9, 4, 5], 3)     # "4 5" was followed by "6 9 4"
    [6, 9, 4]
    >>> lookup_continuation([1, 2, 3], 2)
    []
    """
    L = len(context)
    for m in range(min(max_match, L - 1), 0, -1):
        tail = list(context[L - m:])
        for start in range(L - m - 1, -1, -1):             # most recent earlier occurrence first
            if list(context[start:start + m]) == tail:
                return list(context[start + m:start + m + k])
    return []

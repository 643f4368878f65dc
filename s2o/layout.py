"""Segment and history layout in Python, mirroring csrc/include/s2o/layout.h.

Query rows are cut into segments of ``segment_size`` rows; query row i sits at absolute position
``i + q_offset``. With causal masking, segment s's history is the keys before its first row's
position, ``[0, min(s * segment_size + q_offset, num_keys))``; without a mask it is all keys.
Scores and ranked indices are stored ragged: per (batch, ordering head), the segments' histories
one after another.
"""

from __future__ import annotations

from dataclasses import dataclass


def ceil_div(n: int, tile: int) -> int:
    return -(-n // tile)


@dataclass(frozen=True)
class SegmentLayout:
    num_queries: int
    num_keys: int
    segment_size: int
    q_offset: int = 0
    is_causal: bool = True

    @property
    def num_segments(self) -> int:
        return ceil_div(self.num_queries, self.segment_size)

    def segment_start(self, s: int) -> int:
        """Absolute position of segment s's first query row."""
        return s * self.segment_size + self.q_offset

    def segment_rows(self, s: int) -> range:
        return range(s * self.segment_size, min((s + 1) * self.segment_size, self.num_queries))

    def history_length(self, s: int) -> int:
        if not self.is_causal:
            return self.num_keys
        return max(0, min(self.segment_start(s), self.num_keys))

    def history_offset(self, s: int) -> int:
        """Sum of history_length over segments [0, s), in closed form."""
        if not self.is_causal:
            return s * self.num_keys
        room = self.num_keys - self.q_offset
        growing = ceil_div(room, self.segment_size) if room > 0 else 0
        m = min(s, growing)
        return m * self.q_offset + self.segment_size * m * (m - 1) // 2 + (s - m) * self.num_keys

    @property
    def total_history(self) -> int:
        return self.history_offset(self.num_segments)

    def dense_tiles(self, row_end: int, block_n: int) -> int:
        """Key tiles a dense kernel visits for query rows ending at row_end (for density)."""
        if not self.is_causal:
            return ceil_div(self.num_keys, block_n)
        return ceil_div(min(row_end + self.q_offset, self.num_keys), block_n)

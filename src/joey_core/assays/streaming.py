"""A window summary kept incrementally, in memory bounded by the bins and the values' range.

:class:`WindowCounts` takes a window's values in any number of pieces, in any order, and
gives a :class:`~joey_core.assays.summary.Summary` that depends only on the set of values seen,
never on how they were split or ordered. That is what lets the live assayer (whose counts are
added batch by batch by the loggers, across processes and restarts) and an interactive run
(which reads the same rows from the log in one pass) agree to the last bit:

* bin counts, count, min and max are exact;
* mean and std are computed from exact sums: every float64 is an integer multiple of
  ``2**-1126`` (its square of ``2**-2252``), so the sums of the values and of their squares are
  kept as Python integers, exact for any finite input; the mean is correctly rounded;
* the median is the one statistic no bounded state can give exactly. A window of at most
  ``EXACT_MEDIAN_UP_TO`` values keeps them and has numpy's exact median; a larger one's is
  estimated from a log-bucketed histogram (DDSketch's mapping, buckets ``(gamma**(i-1), gamma**i]`` of the
  magnitude with ``gamma`` about 1.02) that also keeps each bucket's smallest and largest
  value: interpolated by rank between those two, so within 2% of the true middle values'
  magnitude, and exact when they are alone or equal in their bucket (small integers, for instance).

:func:`joey_core.assays.score` keeps numpy's own mean, std and exact median, since it holds every
value anyway; its bin counts, and so its scores and status, are the same as these.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from joey_core.assays.binning import Bins, bin_counts
from joey_core.assays.summary import Aggregation, Summary

EXACT_MEDIAN_UP_TO = 1000
"""Windows of at most this many values keep them (sorted), so their median is numpy's exactly."""

# Bucket bounds grow by this factor: the median's worst relative error is GAMMA - 1 (2%), while
# a window of a million N(0, 1) values needs about 1,100 buckets.
GAMMA = 1.01 / 0.99
_LOG_GAMMA = math.log(GAMMA)
# Magnitudes below the smallest normal float share one bucket (their log is not meaningful).
_TINY = np.finfo(np.float64).tiny

# Every finite float64 is m * 2**e with m an integer, |m| < 2**53, and e >= -1126; so its square
# is m**2 * 2**(2e) with 2e >= -2252. Sums are kept as integers in these units, exact for any input.
_SUM_UNIT_BITS = 1126
_SQUARES_UNIT_BITS = 2 * _SUM_UNIT_BITS
# np.bincount adds float64 weights: digits below 2**k summed over at most 2**(53 - k) values are exact.
_SUM_CHUNK = 1 << 25  # digits of 27 bits
_SQUARES_CHUNK = 1 << 15  # digits of 37 bits (the 18-bit pieces of a mantissa, multiplied in pairs)


def _mantissas(values: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``m`` and ``e`` with ``values == m * 2**e`` exactly."""
    fraction, exponent = np.frexp(values)
    return (fraction * 2.0**53).astype(np.int64), exponent.astype(np.int64) - 53


def _exact_total(digits: list[tuple[npt.NDArray[np.int64], int]], shifts: npt.NDArray[np.int64]) -> int:
    """The sum over i of ``digit[i] * 2**(offset + shifts[i])`` for every (digit, offset), exactly;
    ``shifts`` are non-negative. Values sharing a shift are summed by np.bincount, so Python adds
    only one integer per distinct shift and digit."""
    base = int(shifts.min())
    slot = shifts - base
    sums = [np.bincount(slot, weights=digit) for digit, _ in digits]
    total = 0
    for k in np.flatnonzero(np.any([column != 0 for column in sums], axis=0)):
        at = int(k)
        total += sum(int(column[at]) << offset for column, (_, offset) in zip(sums, digits, strict=True)) << (
            at + base
        )
    return total


def exact_sum(values: npt.NDArray[np.float64]) -> int:
    """The exact sum of finite ``values``, as an integer count of ``2**-1126``."""
    total = 0
    for start in range(0, values.size, _SUM_CHUNK):
        mantissa, exponent = _mantissas(values[start : start + _SUM_CHUNK])
        digits = [(mantissa >> 26, 26), (mantissa & ((1 << 26) - 1), 0)]
        total += _exact_total(digits, exponent + _SUM_UNIT_BITS)
    return total


def exact_sum_of_squares(values: npt.NDArray[np.float64]) -> int:
    """The exact sum of the squares of finite ``values``, as an integer count of ``2**-2252``."""
    total = 0
    for start in range(0, values.size, _SQUARES_CHUNK):
        mantissa, exponent = _mantissas(values[start : start + _SQUARES_CHUNK])
        m = np.abs(mantissa)
        a, b, c = m >> 36, (m >> 18) & 0x3FFFF, m & 0x3FFFF
        # (a 2**36 + b 2**18 + c)**2, term by term: each product stays below 2**37.
        digits = [(a * a, 72), (2 * a * b, 54), (2 * a * c + b * b, 36), (2 * b * c, 18), (c * c, 0)]
        total += _exact_total(digits, 2 * exponent + _SQUARES_UNIT_BITS)
    return total


Buckets = dict[int, tuple[int, float, float]]
"""Log bucket index -> (count, smallest, largest magnitude in it)."""


def _buckets(magnitudes: npt.NDArray[np.float64]) -> Buckets:
    if magnitudes.size == 0:
        return {}
    ordered = np.sort(magnitudes)
    index = np.ceil(np.log(ordered) / _LOG_GAMMA).astype(np.int64)
    starts = np.flatnonzero(np.diff(index, prepend=index[:1] - 1))
    ends = np.append(starts[1:], ordered.size)
    return {
        int(index[s]): (int(e - s), float(ordered[s]), float(ordered[e - 1]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    }


def _add(into: Buckets, other: Buckets) -> None:
    for key, (count, low, high) in other.items():
        if key in into:
            had, had_low, had_high = into[key]
            into[key] = (had + count, min(had_low, low), max(had_high, high))
        else:
            into[key] = (count, low, high)


@dataclass
class WindowCounts:
    """Mergeable counts and sums of a window's values, binned with the baseline's ``bins``."""

    bin_counts: list[int]
    count: int = 0
    present: int = 0  # values that are not NaN
    min: float = math.inf
    max: float = -math.inf
    sum: int = 0
    sum_squares: int = 0
    positive: Buckets = field(default_factory=dict)
    negative: Buckets = field(default_factory=dict)
    zero: int = 0
    values: list[float] | None = field(default_factory=list)
    """The values themselves, sorted, while there are at most EXACT_MEDIAN_UP_TO; then None."""

    @classmethod
    def empty(cls, bins: Bins) -> WindowCounts:
        return cls([0] * bins.count)

    @classmethod
    def of(cls, values: npt.ArrayLike, bins: Bins) -> WindowCounts:
        counts = cls.empty(bins)
        counts.add(values, bins)
        return counts

    def add(self, values: npt.ArrayLike, bins: Bins) -> None:
        """Count ``values`` (finite numbers or NaN) in."""
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return
        self.bin_counts = (np.asarray(self.bin_counts, dtype=np.int64) + bin_counts(x, bins)).tolist()
        self.count += int(x.size)
        present = x[~np.isnan(x)]
        if present.size == 0:
            return
        if not np.isfinite(present).all():
            raise ValueError("values must be finite numbers or NaN")
        self.present += int(present.size)
        self.min = min(self.min, float(present.min()))
        self.max = max(self.max, float(present.max()))
        self.sum += exact_sum(present)
        self.sum_squares += exact_sum_of_squares(present)
        magnitude = np.abs(present)
        tiny = magnitude < _TINY
        self.zero += int(np.count_nonzero(tiny))
        _add(self.positive, _buckets(present[(present > 0) & ~tiny]))
        _add(self.negative, _buckets(-present[(present < 0) & ~tiny]))
        self._keep(present.tolist())

    def _keep(self, values: list[float] | None) -> None:
        if self.values is None or values is None or len(self.values) + len(values) > EXACT_MEDIAN_UP_TO:
            self.values = None
        else:
            self.values = sorted(self.values + values)

    def merge(self, other: WindowCounts) -> None:
        if len(other.bin_counts) != len(self.bin_counts):
            raise ValueError(f"cannot merge {len(other.bin_counts)} bins into {len(self.bin_counts)}")
        self.bin_counts = [a + b for a, b in zip(self.bin_counts, other.bin_counts, strict=True)]
        self.count += other.count
        self.present += other.present
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.sum += other.sum
        self.sum_squares += other.sum_squares
        _add(self.positive, other.positive)
        _add(self.negative, other.negative)
        self.zero += other.zero
        self._keep(other.values)

    def summary(self, bins: Bins, aggregation: Aggregation) -> Summary:
        """The window's summary; raises ValueError when nothing was counted."""
        if self.count == 0:
            raise ValueError("no values to summarize")
        if len(self.bin_counts) != bins.count:
            raise ValueError(f"{len(self.bin_counts)} counts for {bins.count} bins")
        if self.present:
            n = self.present
            total = Fraction(self.sum, 1 << _SUM_UNIT_BITS)
            mean = float(total / n)
            std = _sqrt((Fraction(self.sum_squares, 1 << _SQUARES_UNIT_BITS) - total * total / n) / n)
            lowest, highest, median = self.min, self.max, self._median()
        else:
            lowest = highest = mean = median = std = math.nan
        return Summary.of_counts(
            self.bin_counts, bins, aggregation, count=self.count, stats=(lowest, highest, mean, median, std)
        )

    def _median(self) -> float:
        if self.values is not None:
            return float(np.median(self.values))
        # np.median's rule: the mean of the middle one (odd count) or two (even count) values.
        n = self.present
        return (self._value_at(n // 2 if n % 2 else n // 2 - 1) + self._value_at(n // 2)) / 2

    def _value_at(self, rank: int) -> float:
        """The value of 0-based ``rank`` in ascending order: exact at either end; otherwise
        interpolated by rank between the smallest and largest value of its bucket, so exact
        when those are equal (small integers, for instance) and within a factor ``gamma`` in any case."""
        if rank == 0:
            return self.min
        if rank == self.present - 1:
            return self.max
        seen = 0
        for sign, buckets in ((-1.0, self.negative), (1.0, self.positive)):
            if sign > 0:
                if rank < seen + self.zero:
                    return 0.0
                seen += self.zero
            # Ascending values: the largest magnitudes first on the negative side.
            for key in sorted(buckets, reverse=sign < 0):
                count, low, high = buckets[key]
                if rank < seen + count:
                    share = (rank - seen) / (count - 1) if count > 1 else 0.0
                    return low + (high - low) * share if sign > 0 else -(high - (high - low) * share)
                seen += count
        raise AssertionError(f"rank {rank} beyond {self.present} values")

    def to_bytes(self) -> bytes:
        """A compact binary form (what ``assay_panes`` stores): loggers rewrite it every batch,
        so it must be cheap to encode, decode and write."""
        values = self.values
        squares = _int_bytes(self.sum_squares)
        total = _int_bytes(self.sum)
        header = _HEADER.pack(
            _FORMAT,
            len(self.bin_counts),
            self.count,
            self.present,
            self.zero,
            self.min,
            self.max,
            len(self.positive),
            len(self.negative),
            -1 if values is None else len(values),
            len(total),
            len(squares),
        )
        parts = [header, np.asarray(self.bin_counts, dtype="<i8").tobytes()]
        for buckets in (self.positive, self.negative):
            keys = sorted(buckets)
            parts.append(np.asarray(keys, dtype="<i4").tobytes())
            columns = list(zip(*(buckets[k] for k in keys), strict=True)) or [(), (), ()]
            parts.append(np.asarray(columns[0], dtype="<i8").tobytes())
            parts.append(np.asarray(columns[1], dtype="<f8").tobytes())
            parts.append(np.asarray(columns[2], dtype="<f8").tobytes())
        parts.append(np.asarray(values or [], dtype="<f8").tobytes())
        parts.append(total)
        parts.append(squares)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> WindowCounts:
        """Counts stored by :meth:`to_bytes`; ValueError if ``data`` is not exactly that."""
        if len(data) < _HEADER.size:
            raise ValueError("window counts are truncated")
        header = _HEADER.unpack_from(data)
        if header[0] != _FORMAT:
            raise ValueError(f"window counts in format {header[0]}, expected {_FORMAT}")
        bins, count, present, zero, lowest, highest, positives, negatives, kept, total, squares = header[1:]
        if min(bins, positives, negatives, total, squares) < 0:
            raise ValueError("window counts have a negative length")
        reader = _Reader(data, _HEADER.size)
        bin_counts = reader.array("<i8", bins).tolist()
        buckets = []
        for size in (positives, negatives):
            keys = reader.array("<i4", size).tolist()
            counts = reader.array("<i8", size).tolist()
            lows = reader.array("<f8", size).tolist()
            highs = reader.array("<f8", size).tolist()
            buckets.append(dict(zip(keys, zip(counts, lows, highs, strict=True), strict=True)))
        values = reader.array("<f8", kept).tolist() if kept >= 0 else None
        counts = cls(
            bin_counts=bin_counts,
            count=count,
            present=present,
            min=lowest,
            max=highest,
            sum=int.from_bytes(reader.raw(total), "little", signed=True),
            sum_squares=int.from_bytes(reader.raw(squares), "little", signed=True),
            positive=buckets[0],
            negative=buckets[1],
            zero=zero,
            values=values,
        )
        if not reader.done():
            raise ValueError("window counts have trailing bytes")
        return counts


_FORMAT = 1
_HEADER = struct.Struct("<Biqqqddiiiii")


def _sqrt(value: Fraction) -> float:
    """The square root of a non-negative rational, also when the rational itself is beyond
    float64's range (variances of values near its ends): scaled by a power of 4 near 1 first."""
    if value == 0:
        return 0.0
    halves = (value.numerator.bit_length() - value.denominator.bit_length()) // 2
    scaled = value / (1 << 2 * halves) if halves >= 0 else value * (1 << -2 * halves)
    return math.ldexp(math.sqrt(float(scaled)), halves)


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self._data = data
        self._offset = offset

    def raw(self, size: int) -> bytes:
        chunk = self._data[self._offset : self._offset + size]
        if len(chunk) != size:
            raise ValueError("window counts are truncated")
        self._offset += size
        return chunk

    def done(self) -> bool:
        return self._offset == len(self._data)

    def array(self, dtype: str, count: int) -> npt.NDArray[Any]:
        return np.frombuffer(self.raw(np.dtype(dtype).itemsize * count), dtype=dtype)

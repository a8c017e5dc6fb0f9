"""Measure what Flower's 32-bit mask seeds cost a curious server: a whole search.

    python bench/secagg_seed_search.py

A client whose masked update reaches the server late is treated as dropped out:
SecAgg+ has its neighbours reveal its first secret key, which removes its pairwise
masks. Only its private mask hides its update then, and Flower draws that mask
from NumPy's Mersenne Twister seeded with the 32-byte seed folded to 32 bits
(`pseudo_rand_gen`). This script searches those 2**32 seeds for a planted one, the
way an attacker would with NumPy alone, times the search on a slice, and writes
the time of the whole search into docs/privacy.md. The app's masks
(`secure_masks`) use every bit of the seed: no search of this kind applies.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from federations import write_between_markers
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

ROOT = Path(__file__).resolve().parent.parent
MODULUS, LEVELS = 2**32, 2**22  # SecAgg+'s defaults: a quantized value is <= 2**22
BATCH = 2**20  # seeds per vectorized step
CHECKED = 4  # the first values a candidate must unmask into range
_MASK32 = np.uint64(0xFFFFFFFF)
_MULTIPLIER = np.uint64(1812433253)


def first_outputs(seeds: np.ndarray, count: int) -> np.ndarray:
    """Return the first `count` 32-bit outputs of MT19937 seeded by each of `seeds`.

    NumPy's `RandomState(seed)` for a 32-bit seed: Matsumoto and Nishimura's
    `init_genrand`, then the twist and tempering of each output, for a whole
    batch of seeds at once.
    """
    needed = set(range(count + 1)) | set(range(397, 397 + count))
    word = seeds.astype(np.uint64)
    state = {0: word}
    for i in range(1, 397 + count):
        word = (_MULTIPLIER * (word ^ (word >> np.uint64(30))) + np.uint64(i)) & _MASK32
        if i in needed:  # the state is 624 words; an output needs three
            state[i] = word
    outputs = []
    for k in range(count):
        y = (state[k] & np.uint64(0x80000000)) | (state[k + 1] & np.uint64(0x7FFFFFFF))
        value = state[k + 397] ^ (y >> np.uint64(1))
        value ^= np.where(y & np.uint64(1), np.uint64(0x9908B0DF), np.uint64(0))
        value ^= value >> np.uint64(11)
        value ^= (value << np.uint64(7)) & np.uint64(0x9D2C5680)
        value ^= (value << np.uint64(15)) & np.uint64(0xEFC60000)
        value ^= value >> np.uint64(18)
        outputs.append(value & _MASK32)
    return np.stack(outputs, axis=1)


def search(masked: np.ndarray, start: int, stop: int) -> list[int]:
    """Return the seeds in [start, stop) whose masks unmask `masked` into range."""
    found = []
    for low in range(start, stop, BATCH):
        seeds = np.arange(low, min(low + BATCH, stop), dtype=np.uint64)
        unmasked = (
            masked[None, :] - first_outputs(seeds, CHECKED).astype(np.int64)
        ) % MODULUS
        found += [int(s) for s in seeds[(unmasked <= LEVELS).all(axis=1)]]
    return found


def main() -> None:
    """Plant a seed, find it, and time the search per seed."""
    rng = np.random.default_rng()
    planted = int(rng.integers(0, 2**32))
    update = rng.integers(0, LEVELS, CHECKED)  # a quantized update's first values
    (mask,) = pseudo_rand_gen(
        planted.to_bytes(4, "little") + bytes(28), MODULUS, [(CHECKED,)]
    )
    masked = (update + mask) % MODULUS
    window = 16 * BATCH
    start = max(0, min(planted - window // 2, 2**32 - window))
    began = time.perf_counter()
    found = search(masked, start, start + window)
    seconds = time.perf_counter() - began
    assert planted in found, (planted, found)
    per_seed = seconds / window
    whole = per_seed * 2**32
    # What an attacker writes first: one RandomState per seed.
    began = time.perf_counter()
    for seed in range(10_000):
        np.random.RandomState(seed).randint(0, MODULUS - 1, CHECKED, dtype=np.int64)
    naive = (time.perf_counter() - began) / 10_000
    lines = [
        "| search of the 2**32 seeds, one core | seeds a second | the whole search |",
        "| --- | ---: | ---: |",
        f"| MT19937 over {BATCH:,} seeds at once (NumPy) | {1 / per_seed:,.0f} "
        f"| {whole / 60:,.0f} min |",
        f"| a RandomState per seed (NumPy) | {1 / naive:,.0f} "
        f"| {naive * 2**32 / 3600:,.1f} h |",
    ]
    report = "\n".join(lines)
    write_between_markers(
        ROOT / "docs" / "privacy.md",
        "<!-- seed search: written by bench/secagg_seed_search.py -->",
        "<!-- end of seed search -->",
        report,
    )
    print(report)
    print(f"planted seed {planted} found among {len(found)} candidates of {window:,}")


if __name__ == "__main__":
    main()

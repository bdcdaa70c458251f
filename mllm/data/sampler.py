"""`MixtureBatchSampler`: deterministic, resumable, distributed-aware micro-batches of dataset indices.

Per epoch (a pure function of seed and epoch):
1. draw len(dataset) indices: every sample once, or, when the recipe gives
   source weights, each source's share in proportion to its weight (a source
   is cycled through in shuffled passes when its share exceeds its size);
2. split them into image and text-only pools (a batch never mixes the two);
3. in each pool, shuffle, cut into mega-batches, sort each by exact length and
   cut it into micro-batches (similar lengths → little padding); with a token
   budget, a micro-batch takes as many samples (up to micro_batch_size) as fit
   rows × its longest sample ≤ max_tokens, so short samples come many at a time;
4. shuffle all micro-batches and put the longest first (out-of-memory shows at step 1): the epoch's global
   order, the same for every world size;
5. pad the count to a multiple of world_size and deal them out round-robin to ranks.
The global position inside the epoch is saved in `state_dict()`, so a resumed run continues with exactly the
batches it would have seen, on any number of processes: a run resumed on another world size deals out the rest
of the same global order (nothing already trained on comes again, nothing is left out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MEGABATCH_FACTOR = 64
"""Mega-batch = this many micro-batches: enough to group lengths, small enough to stay random. Not scaled by the
world size, so that the global order does not depend on it."""


class MixtureBatchSampler:
    """Yields lists of dataset indices (one micro-batch for this rank per step)."""

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = True,
        max_tokens: int | None = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None: no token budget), got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.lengths = np.asarray(dataset.lengths, dtype=np.int64)
        self.has_image = np.asarray(dataset.has_image, dtype=bool)
        self.source_of = np.asarray([it.source for it in dataset.items], dtype=np.int64)
        self.weights = dataset.weights
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_by_length = group_by_length
        self.max_tokens = max_tokens
        """Token budget of a micro-batch (padded: rows × its longest sample, images included); micro_batch_size
        stays the cap on its rows. A sample longer than the budget gets a micro-batch of its own."""
        self.epoch = 0
        self.position = 0
        """Micro-batches of this epoch already handed out on this rank."""
        self.start_position = 0
        """Where the current iteration (re)started: after a resume, batches before it were consumed earlier."""
        self.origin = (0, 0)
        """(epoch, global micro-batches of it trained on before this run): a resume point. Dealing out that epoch
        starts there, so that it continues the same global order whatever world size wrote the checkpoint."""
        self._cache: tuple[int, list[list[int]], int] | None = None
        """(epoch, this rank's micro-batches of it from the resume point on, global micro-batches in it)"""

    # ---- the epoch's batches ----------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.lengths)
        if self.weights is None:
            return np.arange(n)
        w = np.asarray(self.weights, dtype=np.float64)
        present = np.array([(self.source_of == s).any() for s in range(len(w))])
        w = np.where(present, w, 0.0)
        quota = _largest_remainder(n * w / w.sum())
        out = []
        for s, q in enumerate(quota):
            pool = np.flatnonzero(self.source_of == s)
            if q == 0:
                continue
            passes = -(-q // len(pool))
            out.append(np.concatenate([rng.permutation(pool) for _ in range(passes)])[:q])
        return np.concatenate(out)

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """Consecutive micro-batches of `order`: micro_batch_size each, or as many as the token budget allows."""
        mb = self.micro_batch_size
        if self.max_tokens is None:
            return [order[i : i + mb].tolist() for i in range(0, len(order), mb)]
        batches, current, widest = [], [], 0
        for i in order.tolist():
            n = int(self.lengths[i])
            if current and (len(current) == mb or (len(current) + 1) * max(widest, n) > self.max_tokens):
                batches.append(current)
                current, widest = [], 0
            current.append(i)
            widest = max(widest, n)
        return batches + ([current] if current else [])

    def _pool_batches(self, pool: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        pool = rng.permutation(pool)
        if not self.group_by_length:
            return self._cut(pool)
        mega = self.micro_batch_size * MEGABATCH_FACTOR
        batches = []
        for m in range(0, len(pool), mega):
            chunk = pool[m : m + mega]
            batches += self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        return batches

    def _global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        drawn = self._draw(rng)
        image = drawn[self.has_image[drawn]]
        text = drawn[~self.has_image[drawn]]
        batches = self._pool_batches(image, rng) + self._pool_batches(text, rng)
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        if self.group_by_length and batches:
            longest = max(
                range(len(batches)), key=lambda i: (int(self.lengths[batches[i]].max()), len(batches[i]))
            )
            batches.insert(0, batches.pop(longest))
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's micro-batches of `epoch` (default: the current one), from the resume point on in its epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            everything = self._global_batches(epoch)
            rest = everything[self.origin[1] :] if epoch == self.origin[0] else everything
            short = -len(rest) % self.world_size  # padded so that every rank gets as many steps
            rest = rest + [everything[i % len(everything)] for i in range(short)]
            self._cache = (epoch, rest[self.rank :: self.world_size], len(everything))
        return self._cache[1]

    # ---- iteration and resumption -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch a loaded state is in the middle of."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self):
        batches = self.batches()
        if self.position >= len(batches):  # the epoch was finished and no set_epoch came: go on with the next
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.batches()
        self.start_position = self.position
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]

    def __len__(self) -> int:
        """Micro-batches per rank in a whole epoch (the epoch a resume continues may have fewer left)."""
        self.batches()
        return -(-self._cache[2] // self.world_size)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The exact position. With a prefetching DataLoader pass `consumed`: micro-batches of this epoch
        actually trained on by this rank (`start_position` + steps since iterating). `global_position` counts
        them over all ranks, from the epoch's start: what a resume on any world size continues from."""
        position = self.position if consumed is None else consumed
        before = self.origin[1] if self.epoch == self.origin[0] else 0
        return {
            "epoch": self.epoch,
            "position": position,
            "global_position": before + position * self.world_size,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.lengths),
            "group_by_length": self.group_by_length,
            "max_tokens": self.max_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "micro_batch_size", "num_samples", "group_by_length", "max_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the data sampler: {key} was {state.get(key)} and is now {mine[key]}; "
                    "the same data, seed, micro-batch size and token budget are needed to continue with the "
                    "same batches"
                )
        self.epoch, self.position = int(state["epoch"]), 0
        self.origin = (self.epoch, int(state.get("global_position", state["position"] * state["world_size"])))
        self._cache = None


def _largest_remainder(shares: np.ndarray) -> list[int]:
    """Integers summing to round(sum(shares)), each floor or ceil of its share."""
    base = np.floor(shares).astype(np.int64)
    left = int(round(shares.sum())) - int(base.sum())
    for i in np.argsort(-(shares - base), kind="stable")[:left]:
        base[i] += 1
    return base.tolist()

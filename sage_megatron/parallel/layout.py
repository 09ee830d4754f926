"""Parallel layouts (tp, pp, dp) and their validation, before any process starts."""
from __future__ import annotations

import math
from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world size or model; the message says what to change."""


@dataclass(frozen=True)
class ParallelLayout:
    """How the actor is split: world_size = tp * pp * dp."""

    tp: int = 1   # tensor-parallel size (heads, FFN and vocabulary split across ranks)
    pp: int = 1   # pipeline-parallel size (layers split into consecutive stages)
    dp: int = 1   # data-parallel size (replicas)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def validate_layout(
    layout: ParallelLayout,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    world_size: int | None = None,
) -> None:
    """Raise LayoutError naming every incompatibility between a layout, a world size and a model."""
    problems = []
    for name in ("tp", "pp", "dp"):
        if getattr(layout, name) < 1:
            problems.append(f"{name}={getattr(layout, name)} must be >= 1")
    if problems:
        raise LayoutError("; ".join(problems))
    if world_size is not None and world_size != layout.world_size:
        problems.append(
            f"world size {world_size} != tp*pp*dp = {layout.tp}*{layout.pp}*{layout.dp} = {layout.world_size}: "
            f"launch {layout.world_size} processes or set dp = {world_size // (layout.tp * layout.pp) or 1}"
        )
    if num_attention_heads % layout.tp:
        problems.append(f"num_attention_heads={num_attention_heads} is not divisible by tp={layout.tp}: "
                        f"use tp in {_divisors(num_attention_heads)}")
    if num_query_groups % layout.tp:
        problems.append(f"num_key_value_heads (query groups)={num_query_groups} is not divisible by tp={layout.tp}: "
                        f"use tp in {_divisors(num_query_groups)}")
    if num_layers % layout.pp:
        problems.append(f"num_hidden_layers={num_layers} is not divisible by pp={layout.pp}: "
                        f"use pp in {_divisors(num_layers)}")
    if problems:
        raise LayoutError("invalid parallel layout: " + "; ".join(problems))


def padded_vocab_size(vocab_size: int, *, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary rounded up to a multiple of lcm(divisible_by, tp).

    With the default 128 the padded size is the same for every power-of-two tp, so a checkpoint
    written at one tp loads at another without re-padding.
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]

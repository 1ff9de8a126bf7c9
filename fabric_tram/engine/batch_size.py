"""The examples of an optimizer step: ``trainer.global_batch_size`` kept exactly, and ``trainer.micro_batch_size=auto``
chosen by the memory estimate as the largest micro-batch the device holds.

The global batch G is what the updates depend on (with its order, the data position is step × G); how it is cut
into processes × accumulate × micro-batches is not (a test holds them equal in float64). So G is the setting to
keep and the micro-batch the one to fill the device with: with ``global_batch_size`` set, ``accumulate`` follows
from the micro-batch (G / (processes × micro)); with ``micro_batch_size=auto`` the micro-batch is the largest
divisor of G / processes whose estimated memory (``fabric-tram estimate``'s, as the preflight uses it) is within
the preflight's share of the free memory (``MARGIN`` of it; a CPU's divided between a node's processes). Every
rank takes the smallest choice of any rank. A run where even 1 does not fit is refused with the preflight's
numbers. The choice is printed and written into the run's config.yaml.
"""

from __future__ import annotations

import copy

from fabric_tram.config import ConfigError
from fabric_tram.engine.estimate import GIB, estimate
from fabric_tram.engine.preflight import MARGIN, available_bytes, preflight_error

AUTO = "auto"


def require_global_batch(t) -> None:
    if t.micro_batch_size == AUTO and t.global_batch_size is None:
        raise ConfigError(
            "trainer.micro_batch_size=auto needs trainer.global_batch_size: the examples per optimizer step to keep "
            "whatever micro-batch fits (e.g. trainer.global_batch_size=64)"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def per_process_batch(t, world_size: int) -> int:
    """G / processes, refusing a global batch that does not divide into the processes."""
    per_process, rest = divmod(t.global_batch_size, world_size)
    if rest or per_process < 1:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} does not divide into {world_size} process(es): choose "
            f"a multiple of {world_size}"
        )
    return per_process


def with_micro(config, micro: int, per_process: int):
    """A copy of ``config`` with this micro-batch and the accumulation that keeps ``per_process`` examples."""
    trial = copy.deepcopy(config)
    trial.trainer.micro_batch_size, trial.trainer.accumulate = micro, per_process // micro
    return trial


def estimated_bytes(config, micro: int, per_process: int, world_size: int) -> float:
    try:
        return estimate(with_micro(config, micro, per_process), devices=world_size)["total_bytes"]
    except (ValueError, KeyError, AttributeError, NotImplementedError, FileNotFoundError) as err:
        raise ConfigError(
            f"trainer.micro_batch_size=auto: model {config.model.name!r} cannot be sized by the estimator "
            f"({type(err).__name__}: {err}); set trainer.micro_batch_size to a number"
        ) from None


def largest_fitting_micro(config, world_size: int, free: float) -> tuple[int | None, dict[int, float]]:
    """The largest divisor of G / processes whose estimate is within MARGIN × ``free`` (None if not even 1),
    and the estimates it looked at (a binary search: memory grows with the micro-batch)."""
    per_process = per_process_batch(config.trainer, world_size)
    candidates, seen = divisors(per_process), {}
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        micro = candidates[middle]
        seen[micro] = estimated_bytes(config, micro, per_process, world_size)
        if seen[micro] <= MARGIN * free:
            best, low = micro, middle + 1
        else:
            high = middle - 1
    return best, seen


def resolve_batch_size(config, world_size: int, device, agree=lambda micro: micro) -> str | None:
    """Settle ``micro_batch_size`` and ``accumulate`` in ``config.trainer`` (in place) from ``global_batch_size``
    and ``micro_batch_size=auto``; returns the line to print, or None when nothing was chosen. ``agree`` makes every
    rank take the same micro-batch (the smallest of their choices: a collective under several processes)."""
    t = config.trainer
    if t.global_batch_size is None:
        require_global_batch(t)
        return None
    per_process = per_process_batch(t, world_size)
    if t.micro_batch_size != AUTO:
        if per_process % t.micro_batch_size:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} over {world_size} process(es) is {per_process} "
                f"examples each, not a multiple of trainer.micro_batch_size={t.micro_batch_size}: choose a divisor "
                f"of {per_process} ({', '.join(map(str, divisors(per_process)))}) or micro_batch_size=auto"
            )
        follows = per_process // t.micro_batch_size
        if t.accumulate not in (1, follows):
            raise ConfigError(
                f"trainer.accumulate={t.accumulate} disagrees with trainer.global_batch_size={t.global_batch_size} = "
                f"{t.micro_batch_size} × {follows} × {world_size}: leave accumulate out (it follows)"
            )
        t.accumulate = follows
        return None
    nodes = max(1, int(t.num_nodes))
    free, where = available_bytes(device, max(1, world_size // nodes))
    micro, seen = largest_fitting_micro(config, world_size, free)
    micro = agree(micro or 0)
    if not micro:
        error = preflight_error(with_micro(config, 1, per_process), world_size, device)
        raise ConfigError(f"trainer.micro_batch_size=auto: even a micro-batch of 1 does not fit. {error}")
    if micro not in seen:  # another rank's smaller choice
        seen[micro] = estimated_bytes(config, micro, per_process, world_size)
    t.micro_batch_size, t.accumulate = micro, per_process // micro
    larger = [m for m in sorted(seen) if m > micro]
    beyond = f"; {larger[0]} would need {seen[larger[0]] / GIB:.2f}" if larger else ""
    return (
        f"trainer.micro_batch_size=auto: {micro}, accumulate {t.accumulate} (global batch {t.global_batch_size} = "
        f"{micro} × {t.accumulate} × {world_size} process(es)); estimated {seen[micro] / GIB:.2f} GiB of the "
        f"{MARGIN * free / GIB:.2f} GiB a process may take ({MARGIN:.0%} of what is free: {where}){beyond}"
    )


def batch_table(config, world_size: int) -> str:
    """``fabric-tram estimate`` of a micro_batch_size=auto config: the estimate at each micro-batch it may choose."""
    require_global_batch(config.trainer)
    per_process = per_process_batch(config.trainer, world_size)
    rows = [
        f"  micro {micro:>5} × accumulate {per_process // micro:>5}: "
        f"{estimated_bytes(config, micro, per_process, world_size) / GIB:9.2f} GiB per device"
        for micro in divisors(per_process)
    ]
    return "\n".join(
        [f"trainer.micro_batch_size=auto (chosen at start: the largest that fits {MARGIN:.0%} of the free memory):"]
        + rows
    )

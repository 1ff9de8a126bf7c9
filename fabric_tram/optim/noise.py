"""Input noise z for tram-x, tram-fisher and r3f: a pure function of (seed, step, example index, position, channel).

So k = 1 vs k = 4, 1 vs 2 processes, any padding and a resumed run all give an example the same z. It is
computed where the embeddings are (on the GPU for a GPU run: no host generator, no copy), by a counter-based
generator: every element's value is the SplitMix64 hash of its own coordinates, so it is the same on every
device and for every batch layout, and nothing is drawn for positions that do not exist. z is added to the output
of the model's token-embedding lookup, through the model's ``input_noise`` forward argument when it has one, or
by a forward hook on the embedding module the user names.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fabric_tram.contracts import input_embedding, unwrap

NOISE_KINDS = ("normal", "uniform")
_MASK64 = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(x: int) -> int:
    """A 64-bit pattern as the signed int64 that holds it (torch has no general uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic: mask the sign copies off)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors: products wrap modulo 2^64, as two's complement does."""
    x = (x ^ _shift_right(x, 30)) * _int64(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _int64(_MIX2)
    return x ^ _shift_right(x, 31)


@dataclass
class NoiseSource:
    """Draws z: ``normal`` (std σ) or ``uniform`` in [-σ, σ], element by element from its coordinates."""

    sigma: float = 0.1
    kind: str = "normal"
    seed: int = 0

    def __post_init__(self):
        if self.sigma < 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.sigma}")
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind {self.kind!r} is not one of normal, uniform")

    def sample(self, step: int, example_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``like`` (batch, length, dim) for the examples ``example_index`` at ``step``, on
        ``like``'s device and in its dtype; no value goes through the host."""
        batch, length, width = like.shape[0], like.shape[1], math.prod(like.shape[2:])
        device = like.device
        index = example_index.to(device=device, dtype=torch.int64).reshape(batch, 1, 1)
        keys = splitmix64(_int64(self.seed * _GOLDEN + step * _MIX1) + index * _int64(_MIX2))  # one per example
        counter = torch.arange(length * width, device=device, dtype=torch.int64).reshape(1, length, width)
        bits = splitmix64(keys + (counter + 1) * _int64(_GOLDEN))  # the SplitMix64 stream of each example
        u1 = (_shift_right(bits, 40).float() + 0.5) / 2**24  # 24 uniform bits each, in (0, 1)
        u2 = ((_shift_right(bits, 16) & 0xFFFFFF).float() + 0.5) / 2**24
        if self.kind == "normal":  # Box-Muller
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        else:
            z = 2.0 * u1 - 1.0
        return (z * self.sigma).reshape(like.shape).to(like.dtype)


def batch_example_index(batch: dict) -> torch.Tensor:
    """The global example indices of a batch (``example_index``), or positions within it for user batches."""
    if isinstance(batch, dict):
        if "example_index" in batch:
            return batch["example_index"]
        first = next(iter(batch.values()))
    elif isinstance(batch, (list, tuple)):
        first = batch[0]
    else:
        first = batch
    return torch.arange(len(first))


def accepts_input_noise(model: torch.nn.Module) -> bool:
    try:
        return "input_noise" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def find_embedding(model: torch.nn.Module, name: str | None) -> torch.nn.Module | None:
    """The module whose output gets the noise: ``name`` if given, else the model's ``input_embedding``."""
    if name:
        for module_name, module in model.named_modules():
            if module_name == name or module_name.endswith("." + name) or module_name.endswith("module." + name):
                return module
        raise ValueError(
            f"embedding module {name!r} not found in the model; pass the dotted name of its "
            "token-embedding module (e.g. 'embeddings.word_embeddings')"
        )
    return input_embedding(model)


class NoiseInjector:
    """Applies ``fn(embeddings) -> noised embeddings`` to the model's input embeddings during a forward."""

    def __init__(self, model: torch.nn.Module, embedding_module: str | None = None):
        self.use_kwarg = embedding_module is None and accepts_input_noise(model)
        self.module = None if self.use_kwarg else find_embedding(model, embedding_module)
        if not self.use_kwarg and self.module is None:
            raise ValueError(
                "this update rule adds noise to the input embeddings, but the model's forward has no input_noise "
                "argument and no embedding module was named: set optimizer.embedding_module to the dotted name of "
                "its token-embedding module"
            )

    @contextlib.contextmanager
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Yields the forward kwargs to pass (``input_noise=fn``), or installs a hook and yields none; the forward
        run inside must apply ``fn`` to the embeddings (checked: the contract's misuses fail here, clearly)."""
        calls = []

        def counted(embeddings):
            calls.append(1)
            return fn(embeddings)

        handle = None if self.use_kwarg else self.module.register_forward_hook(lambda m, args, out: counted(out))
        try:
            yield {"input_noise": counted} if self.use_kwarg else {}
        except TypeError as err:
            if self.use_kwarg and not calls and "function" in str(err):
                raise TypeError(CONTRACT + f" (the forward failed with: {err})") from err
            raise
        finally:
            if handle is not None:
                handle.remove()
        if not calls:
            where = "its forward's input_noise argument" if self.use_kwarg else f"the module {self.module}"
            raise ValueError(f"the model ran a forward without noising its inputs through {where}: " + CONTRACT)


CONTRACT = (
    "a model's input_noise argument is a function to apply to the token embeddings, "
    "`embeddings = input_noise(embeddings)` before positions are added (docs/design.md); "
    "or set optimizer.embedding_module to the token-embedding module's name to add the noise by a hook"
)


class InputNoise:
    """z for one rule: its source (σ, kind, seed) and how it reaches the model (kwarg or hook)."""

    def __init__(
        self,
        model: torch.nn.Module,
        sigma: float,
        kind: str = "normal",
        seed: int = 0,
        embedding_module: str | None = None,
    ):
        self.source = NoiseSource(sigma, kind, seed)
        self.sampler = self.source.sample  # (step, example_index, embeddings) -> z; the user-loop API may replace it
        self.injector = NoiseInjector(model, embedding_module)

    def applied(self, step: int, batch, detach: bool = False):
        """Context manager for one forward on x + z at optimizer ``step``; yields the forward kwargs
        (``detach``: start from the detached embedding lookup, as R3F)."""
        index = batch_example_index(batch)

        def add_noise(embeddings: torch.Tensor) -> torch.Tensor:
            base = embeddings.detach() if detach else embeddings
            return base + self.sampler(step, index, embeddings).to(embeddings.dtype)

        return self.injector.apply(add_noise)

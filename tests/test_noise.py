"""Input noise z: a pure function of (noise_seed, step, example index, position), whatever the batch layout."""

import torch

from fabric_tram.optim.noise import NoiseSource


def draw(source: NoiseSource, step: int, indices: list[int], length: int, dim: int = 5) -> torch.Tensor:
    return source.sample(step, torch.tensor(indices), torch.zeros(len(indices), length, dim))


def test_an_example_gets_the_same_noise_in_any_batch_order_size_and_padding():
    source = NoiseSource(sigma=0.1, seed=3)
    alone = draw(source, 7, [11], length=6)[0]
    in_batch = draw(source, 7, [4, 11, 9], length=10)[1]  # another position in the batch, padded to 10
    torch.testing.assert_close(in_batch[:6], alone, rtol=0, atol=0)


def test_noise_changes_with_the_step_the_example_and_the_seed():
    source = NoiseSource(sigma=0.1, seed=3)
    base = draw(source, 7, [11], length=6)
    assert not torch.equal(base, draw(source, 8, [11], length=6))  # a new z every step
    assert not torch.equal(base, draw(source, 7, [12], length=6))  # every example its own
    assert not torch.equal(base, draw(NoiseSource(sigma=0.1, seed=4), 7, [11], length=6))
    assert not torch.equal(base, draw(source, 11, [7], length=6))  # step and example index do not commute


def test_normal_and_uniform_have_the_requested_scale():
    normal = draw(NoiseSource(sigma=0.5, seed=0), 1, list(range(32)), length=64, dim=32)
    assert abs(float(normal.std()) - 0.5) < 0.01  # 65,536 draws: the std's own error is ~0.0014
    uniform = draw(NoiseSource(sigma=0.5, kind="uniform", seed=0), 1, list(range(32)), length=64, dim=32)
    assert float(uniform.abs().max()) <= 0.5 and float(uniform.abs().max()) > 0.49


def test_bad_noise_settings_are_refused():
    import pytest

    with pytest.raises(ValueError, match="noise sigma must be >= 0"):
        NoiseSource(sigma=-1.0)
    with pytest.raises(ValueError, match="noise kind 'gauss' is not one of normal, uniform"):
        NoiseSource(kind="gauss")


def test_noise_is_drawn_on_the_embeddings_device_in_their_dtype_without_host_values():
    source = NoiseSource(sigma=0.1, seed=3)
    like = torch.zeros(2, 5, 4, dtype=torch.bfloat16)
    z = source.sample(7, torch.tensor([11, 4]), like)
    assert z.dtype == torch.bfloat16 and z.device == like.device and z.shape == like.shape
    reference = source.sample(7, torch.tensor([4, 11]), torch.zeros(2, 5, 4))  # another batch order, float32
    torch.testing.assert_close(z.float(), reference.flip(0).bfloat16().float(), rtol=0, atol=0)


def test_the_stream_is_splitmix64():
    """The generator is SplitMix64 (known values), so noise is the same on any device and any torch build."""
    from fabric_tram.optim.noise import splitmix64

    # splitmix64 of the state 0x9E3779B97F4A7C15 (the first output of the generator seeded with 0)
    out = splitmix64(torch.tensor(0x9E3779B97F4A7C15 - (1 << 64)))
    assert int(out) & ((1 << 64) - 1) == 0xE220A8397B1DCDAF

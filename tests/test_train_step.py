"""The jit train step: sharded equals single-device, compiles once, every fusion trains."""
import jax
import numpy as np
import pytest

from fll_jax.train.cross_validate import build_steps
from fll_jax.train.sharding import make_mesh, replicate, shard_batch
from fll_jax.train.step import DEVICE_KEYS
from tests.helpers import random_batch, tiny_config


def _run(config, devices, batch, num_steps):
    steps = build_steps(config, steps_per_epoch=10, devices=devices)
    state = steps.init(jax.random.PRNGKey(0))
    losses = []
    for _ in range(num_steps):
        state, metrics = steps.train(state, shard_batch(batch, steps.mesh, DEVICE_KEYS))
        losses.append(float(metrics["loss"]))
    return steps, state, losses


def test_four_devices_match_one_device_and_compile_once():
    assert jax.device_count() == 4
    config = tiny_config("sequences=t2w+lap+dp")
    batch = random_batch()
    _, one_state, one_losses = _run(config, jax.devices()[:1], batch, 3)
    steps, four_state, four_losses = _run(config, jax.devices(), batch, 3)
    # Same math, different reduction order across devices: f32 rounding only.
    np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.device_get(four_state.params), jax.device_get(one_state.params))
    assert four_state.params["branch_t2w"] is not None
    assert steps.train._cache_size() == 1
    assert int(four_state.step) == 3


@pytest.mark.parametrize(
    "arg",
    [
        "fusion=paper",
        "fusion=concat",
        "fusion=attention",
        "fusion=late",
        "fusion=shared",
        "sequences=t2w,fusion=paper",
        "sequences=dwi+adc+pvp,fusion=paper",
    ],
)
def test_fusions_and_subsets_learn_a_fixed_batch(arg):
    config = tiny_config(arg + ",width=2")
    config.sequences = config.sequences if "sequences" in arg else ("t2w", "adc", "lap")
    config.augment.enabled = False
    config.optim.warmup_epochs = 0
    config.optim.learning_rate = 1e-2
    _, state, losses = _run(config, jax.devices(), random_batch(), 6)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    branches = {k for k in state.params if k.startswith("branch_")}
    if config.model.fusion == "shared":
        # One backbone for every sequence, no per-sequence branch weights.
        assert not branches and "backbone" in state.params
    else:
        assert branches == {f"branch_{s}" for s in config.sequences}


def test_placed_host_arrays_give_every_device_its_own_buffer():
    # device_get returns 64-byte-aligned memory, which jax.device_put hands to every CPU device as
    # one buffer; a donated step updating it in place would race across the devices.
    host = jax.device_get(jax.numpy.arange(4096, dtype=np.float32).reshape(64, 64))
    placed = replicate({"w": host, "step": np.int32(3)}, make_mesh())
    pointers = {shard.data.unsafe_buffer_pointer() for shard in placed["w"].addressable_shards}
    assert len(pointers) == jax.device_count() == 4
    np.testing.assert_array_equal(np.asarray(placed["w"]), host)
    assert placed["w"].sharding.is_fully_replicated and int(placed["step"]) == 3

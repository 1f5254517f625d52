"""The jit train step: sharded equals single-device, compiles once, every fusion trains."""
import jax
import numpy as np
import pytest

from fll_jax.train.cross_validate import build_steps
from fll_jax.train.sharding import make_mesh, replicate, shard_batch
from fll_jax.train.step import DEVICE_KEYS
from tests.helpers import TRAINED, random_batch, tiny_config


def _run(config, devices, batch, num_steps):
    steps = build_steps(config, steps_per_epoch=10, devices=devices)
    state = steps.init(jax.random.PRNGKey(0))
    losses = []
    for _ in range(num_steps):
        state, metrics = steps.train(state, shard_batch(batch, steps.mesh, DEVICE_KEYS), steps.schedule)
        losses.append(float(metrics["loss"]))
    return steps, state, losses


# The fusions first: by the tests after them, other modules have put the four-device train step
# of TRAINED in the persistent compilation cache (compiled at once by three workers, it had cost
# three compiles).
@pytest.mark.parametrize(
    "arg",
    [
        "fusion=paper",
        "fusion=concat",
        "fusion=attention",
        "fusion=late",
        "fusion=shared",
        # one branch: the paper fusion's class head then has no phase branch to add (the
        # two-branch cases above already give it a partial group of each head's, adc and lap)
        "sequences=t2w,fusion=paper",
    ],
)
def test_fusions_and_subsets_learn_a_fixed_batch(arg):
    config = tiny_config(arg + ",width=2")
    config.sequences = config.sequences if "sequences" in arg else ("adc", "lap")
    config.augment.enabled = False
    config.optim.warmup_epochs = 0
    config.optim.learning_rate = 1e-2
    # One device: the claim is about the fusion, and a one-device step compiles sooner.
    _, state, losses = _run(config, jax.devices()[:1], random_batch(), 6)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    branches = {k for k in state.params if k.startswith("branch_")}
    if config.model.fusion == "shared":
        # One backbone for every sequence, no per-sequence branch weights.
        assert not branches and "backbone" in state.params
    else:
        assert branches == {f"branch_{s}" for s in config.sequences}


def test_four_devices_match_one_device_and_compile_once():
    assert jax.device_count() == 4
    config = tiny_config(TRAINED)
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


def test_the_same_settings_reuse_their_programs_in_a_process():
    """A rerun, another workdir or data folder, or a fold model loaded again: the jitted programs
    built for the same settings serve again (not traced, lowered or compiled again)."""
    config = tiny_config(TRAINED)
    first = build_steps(config, steps_per_epoch=10, devices=jax.devices()[:1])
    moved = config.copy_and_resolve_references()
    moved.data.root, moved.data.workers = "/elsewhere", 1
    again = build_steps(moved, steps_per_epoch=3, devices=jax.devices()[:1])
    assert again.train is first.train and again.predict is first.predict and again.init is first.init
    assert float(again.schedule(5)) != float(first.schedule(5))  # each call's own schedule
    config.model.width = 4  # a caller's later change does not reach the programs built before it
    wider = build_steps(config, steps_per_epoch=10, devices=jax.devices()[:1])
    assert wider.train is not first.train
    assert build_steps(tiny_config(TRAINED), steps_per_epoch=10, devices=jax.devices()[:1]).train is first.train
    assert build_steps(tiny_config(TRAINED), steps_per_epoch=10).train is not first.train  # four devices


def test_a_branch_whose_sequence_no_lesion_had_keeps_its_running_averages():
    """Batch norm's statistics of a batch without any DWI image are those of zeros: DWI's
    running averages stay as they were, while the other branches' move."""
    from fll_jax.constants import SEQUENCES

    config = tiny_config(TRAINED)  # the one-device program of the test above
    batch = random_batch()
    k = SEQUENCES.index("dwi")
    batch["image"][:, k] = batch["mask"][:, k] = 0
    batch["present"][:, k] = False
    steps = build_steps(config, steps_per_epoch=10, devices=jax.devices()[:1])
    before = jax.device_get(steps.init(jax.random.PRNGKey(0)).batch_stats)
    _, state, _ = _run(config, jax.devices()[:1], batch, 1)
    after = jax.device_get(state.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, after["branch_dwi"], before["branch_dwi"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["branch_t2w"], before["branch_t2w"])
    assert all(jax.tree.leaves(moved))


def test_placed_host_arrays_give_every_device_its_own_buffer():
    # device_get returns 64-byte-aligned memory, which jax.device_put hands to every CPU device as
    # one buffer; a donated step updating it in place would race across the devices.
    host = jax.device_get(jax.numpy.arange(4096, dtype=np.float32).reshape(64, 64))
    placed = replicate({"w": host, "step": np.int32(3)}, make_mesh())
    pointers = {shard.data.unsafe_buffer_pointer() for shard in placed["w"].addressable_shards}
    assert len(pointers) == jax.device_count() == 4
    np.testing.assert_array_equal(np.asarray(placed["w"]), host)
    assert placed["w"].sharding.is_fully_replicated and int(placed["step"]) == 3


def test_the_fed_schedule_is_optax_adamw_and_one_program_serves_every_schedule():
    import optax

    from fll_jax.train.step import learning_rate_schedule, make_optimizer

    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
    tx = make_optimizer(tiny_config())
    update = jax.jit(lambda grads, state, params, schedule: tx.update(grads, state, params, schedule=schedule))
    for epochs, warmup_epochs, learning_rate in ((2, 1, 3e-3), (3, 0, 1e-2)):
        config = tiny_config(f"epochs={epochs}")
        config.optim.warmup_epochs, config.optim.learning_rate = warmup_epochs, learning_rate
        # optax's own AdamW on its warm-up cosine schedule, as the config asks; 14 steps pass the
        # first schedule's end (10 steps) and stop inside the second's (15).
        schedule = learning_rate_schedule(config, steps_per_epoch=5)
        total, warmup = config.train.epochs * 5, config.optim.warmup_epochs * 5
        reference = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, config.optim.learning_rate, warmup, total),
            weight_decay=config.optim.weight_decay))
        ours, theirs = tx.init(params), reference.init(params)
        # Same state layout, so checkpoints written before the schedule was fed still restore.
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        p = q = jax.tree.map(jax.numpy.asarray, params)
        for step in range(14):
            grads = jax.tree.map(lambda a: np.cos(a * (step + 1)).astype(np.float32), p)
            u, ours = update(grads, ours, p, schedule)
            v, theirs = reference.update(grads, theirs, q)
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8), p, q)
    assert update._cache_size() == 1  # both schedules ran one compiled program

"""Train state, optimiser and the pure, jit-compiled train and evaluation steps."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from fll_jax.constants import sequence_index
from fll_jax.train.augment import drop_sequences, prepare_inputs
from fll_jax.train.loss import multitask_loss
from fll_jax.train.sharding import data_sharding, replicate, replicated

# Batch entries the device needs; the rest (ids, metadata) stay on the host.
DEVICE_KEYS = ("image", "mask", "present", "zoom_max", "label7", "valid")
# The ones the prediction step takes.
PREDICT_KEYS = ("image", "mask", "present")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class Schedule:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to 0 at step `total`
    (optax.warmup_cosine_decay_schedule's curve). A pytree: the train step takes it as an argument,
    so its numbers are data, not constants, and one compiled step serves every schedule."""

    peak: jax.Array
    warmup: jax.Array
    total: jax.Array

    def __call__(self, step) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        rising = self.peak * step / jnp.maximum(self.warmup, 1.0)
        progress = jnp.clip((step - self.warmup) / jnp.maximum(self.total - self.warmup, 1.0), 0.0, 1.0)
        return jnp.where(step < self.warmup, rising, 0.5 * self.peak * (1.0 + jnp.cos(jnp.pi * progress)))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
    """The config's schedule over the whole run, warm-up included (step -> learning rate)."""
    total = max(1, config.train.epochs * steps_per_epoch)
    warmup = min(total - 1, config.optim.warmup_epochs * steps_per_epoch)
    return Schedule(*(np.float32(v) for v in (config.optim.learning_rate, warmup, total)))


def scale_by_fed_schedule() -> optax.GradientTransformationExtraArgs:
    """Updates times -schedule(count), the Schedule given to each update as `schedule=`; the state
    is optax's ScaleByScheduleState, as in optax.adamw, so checkpoints keep their layout."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, schedule: Schedule, **extra_args):
        del params, extra_args
        step_size = -schedule(state.count)
        updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """AdamW on a fed Schedule (update(..., schedule=...)), after clipping the global gradient norm.

    The inner chain is optax.adamw's (Adam, decoupled weight decay, the learning rate) with the
    schedule's numbers as arguments instead of constants.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.optim.grad_clip),
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(config.optim.weight_decay),
                    scale_by_fed_schedule()),
    )


def rng_settings(config: ml_collections.ConfigDict):
    """A context in which JAX's random numbers follow the config (config.threefry_partitionable).

    Both forms of threefry give the same bits however arrays are sharded, but not the same bits
    as each other, so the choice is part of the config (and of the run's fingerprint).
    """
    return jax.threefry_partitionable(bool(config.threefry_partitionable))


def seq_indices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    return tuple(sequence_index(s) for s in config.sequences)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, config) -> Callable:
    """key -> a fresh TrainState (traceable, so it can be shape-evaluated or jitted)."""
    shape = (1, len(config.sequences), config.input_size, config.input_size, config.input_size, 2)

    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros(shape, jnp.float32), train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(variables["params"]),
            rng=state_key,
        )

    return init


def make_init(model: nn.Module, tx, config, mesh: Mesh) -> Callable[[jax.Array], TrainState]:
    """rng -> a fresh TrainState replicated on the mesh, computed op by op, not jitted.

    A jitted init compiles one chain of threefry hashes per parameter (on this 2-core CPU 7 s for
    three tiny branches, 14 s for seven); op by op, each random draw's small program is compiled
    once per shape and serves every parameter and every model of the process.
    """
    init = _init_fn(model, tx, config)
    return lambda key: replicate(jax.device_get(init(key)), mesh)


def abstract_state(model: nn.Module, tx, config, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, the target that checkpoints restore into."""
    abstract = jax.eval_shape(_init_fn(model, tx, config), jax.random.PRNGKey(0))
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict:
    weights = tuple(config.loss.class_weights)
    return dict(
        binary_weight=config.loss.binary_weight,
        multiclass_weight=config.loss.multiclass_weight,
        label_smoothing=config.loss.label_smoothing,
        class_weights=jnp.asarray(weights, jnp.float32) if weights else None,
    )


def keep_unseen_statistics(old: dict, new: dict, present: jax.Array, sequences) -> dict:
    """The updated batch-norm running averages, except a branch's whose sequence no lesion of the
    batch had: its statistics were those of zeros, which would pull its averages away from the
    images it normalises at inference."""
    seen = jnp.any(present, axis=0)
    kept = dict(new)
    for i, seq in enumerate(sequences):
        name = f"branch_{seq}"
        if name in new:
            kept[name] = jax.tree.map(lambda n, o: jnp.where(seen[i], n, o), new[name], old[name])
    return kept


def train_step(state: TrainState, batch: dict, schedule: Schedule, *, model: nn.Module, tx,
               config) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch: augment, forward, multitask loss, AdamW at the
    schedule's learning rate."""
    rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng, sequence_rng = jax.random.split(rng, 3)
    x = prepare_inputs(batch, seq_indices(config), config.input_size, aug_rng, config.augment)
    if config.train.sequence_dropout > 0:
        x = drop_sequences(x, sequence_rng, config.train.sequence_dropout)

    def loss_fn(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        loss, parts = multitask_loss(outputs, batch["label7"], valid=batch["valid"], **_loss_kwargs(config))
        correct = (jnp.argmax(outputs["logits7"], -1) == batch["label7"]).astype(jnp.float32)
        batch_stats = keep_unseen_statistics(state.batch_stats, updates["batch_stats"], outputs["present"],
                                             config.sequences)
        return loss, (batch_stats, dict(parts, loss=loss, accuracy_7way=correct.mean()))

    (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, schedule=schedule)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)  # before clipping
    metrics["param_norm"] = optax.global_norm(params)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def predict(variables: dict, batch: dict, *, model: nn.Module, config) -> dict:
    """Class probabilities of both heads for a batch, without augmentation, and the attention
    fusions' sequence_weights [B, S] (over config.sequences)."""
    x = prepare_inputs(batch, seq_indices(config), config.input_size)
    outputs = model.apply(variables, x, train=False)
    probs = {
        "p2": jax.nn.softmax(outputs["logits2"].astype(jnp.float32)),
        "p7": jax.nn.softmax(outputs["logits7"].astype(jnp.float32)),
    }
    if "sequence_weights" in outputs:
        probs["sequence_weights"] = outputs["sequence_weights"].astype(jnp.float32)
    return probs


def compile_steps(model: nn.Module, tx, config, mesh: Mesh) -> tuple[Callable, Callable, Callable]:
    """(init, jit-compiled train_step and predict) for this mesh; the state buffer is donated.

    train(state, batch, schedule) takes its learning-rate Schedule as an argument."""
    batch_sharding = {k: data_sharding(mesh) for k in DEVICE_KEYS}
    rep = replicated(mesh)
    train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, config=config),
        in_shardings=(rep, batch_sharding, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    pred = jax.jit(
        functools.partial(predict, model=model, config=config),
        in_shardings=(rep, {k: data_sharding(mesh) for k in PREDICT_KEYS}),
        out_shardings=rep,
    )
    return make_init(model, tx, config, mesh), train, pred

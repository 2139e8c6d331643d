"""NAYER (Tran et al., CVPR 2024): a generator fed with label embeddings, a noisy layer re-initialised every round,
and a pool of the best batch of each round.

Per epoch: `g_loops` rounds (`warmup_g_loops` during the first `warmup` epochs); each round re-initialises the noisy
layer, creates a fresh Adam, takes `g_steps` generator steps on 10·BN + 0.5·CE + 1.33·adv (adv only after warm-up)
and adds the lowest-loss batch of the round (with the labels it was made for) to the pool. Then `kd_steps` student
steps on the pool (none during warm-up). The whole generator is rebuilt every `g_life` epochs.

Upstream's student mode during synthesis: `synthesize()` starts with `student.eval()` and calls `student.train()` at
the end of every round, so from the second round of an epoch on the adversarial term sees the student with batch
statistics and moves its running statistics. That is the default here too
(config.synthesis.student_train_from_second_round; False keeps the student in eval mode throughout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import augment, distributed, losses, pool, validate
from dfkd_jax.methods.base import (EpochPlan, Method, State, class_balanced_targets, grid_by_class, label_embedding,
                                   mean_metrics)
from dfkd_jax.models.generators import Generator, reinit_noisy_layer


class Nayer(Method):
    name = "nayer"
    batch_sharded = ("pool", "round/targets", "round/best_images")
    CONFIG_RULES = {
        "synthesis.g_loops": validate.integer(1), "synthesis.warmup_g_loops": validate.integer(1),
        "synthesis.g_life": validate.integer(1), "synthesis.noisy_size": validate.integer(1),
        "synthesis.embedding_dim": validate.integer(1), "synthesis.ngf": validate.integer(1),
    }

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis = config.synthesis
        self.batch = synthesis.batch_size
        self.embeddings = jnp.asarray(label_embedding(self.num_classes, synthesis.embedding_dim,
                                                      config.data.label_embedding_file, config.seed))
        self.generator = self.make_generator()
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        self.rebuild_generator = jax.jit(self._rebuild_generator, donate_argnums=0)
        self.start_round = jax.jit(self._start_round, donate_argnums=0)
        # Three variants, compiled once each: warm-up (no adversarial term, which costs a student pass), and the
        # adversarial term with the student in eval or in train mode.
        self.generator_step = {
            (adversarial, student_train): jax.jit(functools.partial(
                self._generator_step, adversarial=adversarial, student_train=student_train), donate_argnums=0)
            for adversarial, student_train in ((False, False), (True, False), (True, True))}
        self.end_round = jax.jit(self._end_round, donate_argnums=0)

    # ------------------------------------------------------------- what a method built on NAYER may change
    def make_generator(self) -> Generator:
        synthesis = self.config.synthesis
        return Generator.create(
            "nayer", 0, embedding_size=self.embeddings.shape[1], batch_size=self.batch, chunk=self.num_classes,
            noisy_size=synthesis.noisy_size, ngf=synthesis.ngf, image_size=self.image_shape[0],
            channels=self.image_shape[2])[0]

    def round_targets(self, key: jax.Array) -> jax.Array:
        return class_balanced_targets(key, self.batch, self.num_classes)

    def generator_inputs(self, targets: jax.Array, noise_key: jax.Array | None):
        """What the generator is fed to make `targets`: their label embeddings."""
        del noise_key
        return self.batch_constraint(self.embeddings[targets])

    def pool_groups(self, synth: dict) -> jax.Array | None:
        """Group ids of the round's kept images in the pool (None: no groups)."""
        return None

    # -------------------------------------------------------------------------------------------- state
    def init(self, key: jax.Array) -> dict:
        variables = self.generator.init(key)
        channels = self.teacher.bn_channels(self.image_shape)
        zero_moments = {k: v for k, v in losses.init_bn_ema(channels).items() if k != "valid"}
        return {
            "generator": variables,
            "generator_opt": self.optimizer.init(variables["params"]),
            "bn_ema": losses.init_bn_ema(channels),
            "pool": pool.create(self.pool_capacity(self.kept_batches(), self.batch), self.image_shape,
                                self.config.pool.dtype),
            "round": {"targets": jnp.zeros((self.batch,), jnp.int32), "best_loss": jnp.full((), jnp.inf, jnp.float32),
                      "best_images": jnp.zeros((self.batch, *self.image_shape)), "last_moments": zero_moments},
        }

    def kept_batches(self) -> int:
        """One batch per round of the whole schedule."""
        schedule, synthesis = self.config.schedule, self.config.synthesis
        return (min(schedule.warmup, schedule.epochs) * synthesis.warmup_g_loops
                + max(schedule.epochs - schedule.warmup, 0) * synthesis.g_loops)

    # --------------------------------------------------------------------------------------------- plan
    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.config.schedule.warmup

    def plan(self, epoch: int) -> EpochPlan:
        synthesis = self.config.synthesis
        loops = synthesis.warmup_g_loops if self.in_warmup(epoch) else synthesis.g_loops
        kd_steps = 0 if self.in_warmup(epoch) else self.config.schedule.kd_steps
        return EpochPlan(cycles=1, kd_steps=kd_steps, synthesis_steps=loops * synthesis.g_steps,
                         synthesis_batch=self.batch)

    def rebuilds_generator(self, epoch: int) -> bool:
        """Upstream: `(ep - warmup) % g_life == 0 or ep % g_life == 0` (Python's modulo)."""
        g_life, warmup = self.config.synthesis.g_life, self.config.schedule.warmup
        return (epoch - warmup) % g_life == 0 or epoch % g_life == 0

    # ----------------------------------------------------------------------------------------- synthesis
    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        if self.rebuilds_generator(epoch):
            state = self.rebuild_generator(state)
        plan = self.plan(epoch)
        adversarial = not self.in_warmup(epoch) and self.config.synthesis.adv_weight > 0
        history, round_history = [], []
        for round_index in range(plan.synthesis_steps // self.config.synthesis.g_steps):
            student_train = (adversarial and round_index > 0
                             and self.config.synthesis.student_train_from_second_round)
            step = self.generator_step[adversarial, student_train]
            state = self.start_round(state)
            for _ in range(self.config.synthesis.g_steps):
                state, metrics = step(state, teacher_variables)
                history.append(metrics)
                if on_step:
                    on_step(self.batch, metrics)
            state, round_metrics = self.end_round(state)
            round_history.append(round_metrics)
        best_losses = [float(v) for v in jax.device_get([m["synthesis/best_loss"] for m in round_history])]
        # Each round's own best loss too (rounds of one epoch, in order): how fast synthesis converges.
        return state, mean_metrics(history) | mean_metrics(round_history[-1:]) | {
            "synthesis/best_loss": float(sum(best_losses) / len(best_losses)),
            **{f"synthesis/round_best_loss/{r}": loss for r, loss in enumerate(best_losses)}}

    def _rebuild_generator(self, state: State) -> State:
        rng, key = jax.random.split(state["rng"])
        variables = self.generator.init(key)
        synth = state["synth"] | {"generator": variables,
                                  "generator_opt": self.optimizer.init(variables["params"])}
        return self.constrain(state | {"rng": rng, "synth": synth})

    def _start_round(self, state: State) -> State:
        rng, noisy_key, targets_key = jax.random.split(state["rng"], 3)
        synth = state["synth"]
        params = reinit_noisy_layer(synth["generator"]["params"], noisy_key)
        round_state = synth["round"] | {"targets": self.round_targets(targets_key),
                                        "best_loss": jnp.full((), jnp.inf, jnp.float32)}
        synth = synth | {"generator": synth["generator"] | {"params": params},
                         "generator_opt": self.optimizer.init(params), "round": round_state}
        return self.constrain(state | {"rng": rng, "synth": synth})

    def generator_loss(self, params, batch_stats, targets: jax.Array, crop: augment.CropFlip, bn_ema: dict,
                       teacher_variables: dict, student_variables: dict, *, adversarial: bool,
                       student_train: bool = False, noise_key: jax.Array | None = None):
        """10·BN + 0.5·CE + 1.33·adv of the batch the generator makes for `targets`, seen through the crop/flip
        draw `crop`; with `student_train` the adversarial term runs the student in train mode (batch statistics).
        Returns (loss, (images, batch_stats, moments, terms, the student's batch statistics))."""
        weights = self.config.synthesis
        inputs = self.generator_inputs(targets, noise_key)
        images, batch_stats = self.generator.apply({"params": params, "batch_stats": batch_stats}, inputs,
                                                   train=True)
        images = self.batch_constraint(images)
        augmented = augment.crop_flip(images, crop)
        teacher_out, _ = self.teacher.apply(teacher_variables, augmented, train=False)
        bn, moments = losses.bn_statistics_loss(teacher_out.bn_inputs, bn_ema, weights.bn_momentum)
        ce = losses.cross_entropy(teacher_out.logits, jax.nn.one_hot(targets, self.num_classes))
        terms = {"synthesis/bn": bn, "synthesis/ce": ce}
        student_batch_stats = student_variables["batch_stats"]
        if adversarial:
            student_out, student_batch_stats = self.student.apply(student_variables, augmented, train=student_train)
            terms["synthesis/adv"] = losses.adversarial_masked_kl(student_out.logits, teacher_out.logits)
        loss = weights.bn_weight * bn + weights.ce_weight * ce + weights.adv_weight * terms.get("synthesis/adv", 0.0)
        return loss, (images, batch_stats, moments, terms, student_batch_stats)

    def generator_update(self, generator_variables: dict, generator_opt, targets: jax.Array,
                         crop: augment.CropFlip, bn_ema: dict, teacher_variables: dict, student_variables: dict, *,
                         adversarial: bool, student_train: bool = False, noise_key: jax.Array | None = None):
        """One Adam step of the generator on explicit inputs, the core of a NAYER step (the benchmark and the
        PyTorch parity tests call it with fixed draws). Returns (variables, opt state, loss, terms, images made
        before the update, BN-input moments, the student's batch statistics after its forward pass)."""
        params = generator_variables["params"]
        (loss, (images, batch_stats, moments, terms, student_batch_stats)), grads = jax.value_and_grad(
            self.generator_loss, has_aux=True)(params, generator_variables["batch_stats"], targets, crop, bn_ema,
                                               teacher_variables, student_variables, adversarial=adversarial,
                                               student_train=student_train, noise_key=noise_key)
        updates, generator_opt = self.optimizer.update(grads, generator_opt, params)
        generator_variables = {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats}
        return generator_variables, generator_opt, loss, terms, images, moments, student_batch_stats

    def _generator_step(self, state: State, teacher_variables: dict, *, adversarial: bool,
                        student_train: bool) -> tuple[State, dict]:
        rng, augment_key = jax.random.split(state["rng"])
        synth = state["synth"]
        round_state = synth["round"]
        crop = augment.crop_flip_params(augment_key, self.batch)
        generator, generator_opt, loss, terms, images, moments, student_batch_stats = self.generator_update(
            synth["generator"], synth["generator_opt"], round_state["targets"], crop, synth["bn_ema"],
            teacher_variables, state["student"], adversarial=adversarial, student_train=student_train,
            noise_key=self.step_noise_key(round_state, augment_key))
        better = loss < round_state["best_loss"]  # upstream keeps the batch made before the update
        round_state = round_state | {
            "best_loss": jnp.where(better, loss, round_state["best_loss"]),
            "best_images": jnp.where(better, jax.lax.stop_gradient(images), round_state["best_images"]),
            "last_moments": moments}
        synth = synth | {"generator": generator, "generator_opt": generator_opt, "round": round_state}
        student = state["student"] | {"batch_stats": student_batch_stats}
        return (self.constrain(state | {"rng": rng, "synth": synth, "student": student}),
                {"synthesis/loss": loss, **terms})

    def step_noise_key(self, round_state: dict, augment_key: jax.Array) -> jax.Array:
        """A key for input noise drawn at each step (NAYER's inputs have none), apart from the crop draw's."""
        del round_state
        return jax.random.fold_in(augment_key, 1)

    def _end_round(self, state: State) -> tuple[State, dict]:
        synth = state["synth"]
        round_state = synth["round"]
        new_pool = pool.add(synth["pool"], round_state["best_images"], round_state["targets"], self.pool_groups(synth))
        ema = synth["bn_ema"]
        if self.config.synthesis.bn_momentum > 0:
            ema = losses.update_bn_ema(ema, round_state["last_moments"], self.config.synthesis.bn_momentum)
        synth = synth | {"pool": new_pool, "bn_ema": ema}
        return self.constrain(state | {"synth": synth}), {"synthesis/best_loss": round_state["best_loss"],
                                                           "pool/size": new_pool["count"]}

    # ------------------------------------------------------------------------------------------ student
    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        batch, synth_pool = self.sample_pool(synth["pool"], key)
        return batch, synth | {"pool": synth_pool}

    preview_columns = 10  # the grid: one row per class, up to 10 of the newest round's images each

    def preview(self, state: State):
        round_state = distributed.fetch(state["synth"]["round"])  # sharded over every process's devices
        return grid_by_class(round_state["best_images"], round_state["targets"], self.num_classes,
                             self.preview_columns)

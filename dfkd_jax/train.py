"""The trainer: one DFKD run, read top to bottom.

    workdir → mesh → teacher and eval data → student and method → optimizer → state (or resume) → steps →
    loop (synthesise, distil, evaluate, log, checkpoint) → summary

The method (config.method) decides how synthetic images are made and what the student trains on; the trainer
never changes when a method is added.

Multi-process runs (dfkd_jax/distributed.py) run this same function on every process over one mesh of all their
devices: every process takes every step, evaluates its share of the images and writes its shards of each checkpoint;
process 0 alone writes the files a user reads (config.json, metrics, TensorBoard, image grids, student/, summary).
SIGTERM stops the run at the end of the epoch it is in, after its checkpoint (`distributed.Preempted`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from dfkd_jax import (checkpoints, distill, distributed, methods, parallel, reporting, teachers, transfer,
                      validate)
from dfkd_jax.evaluate import evaluate
from dfkd_jax.methods.base import mean_metrics
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.network_io import save_network


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> dict:
    # ------------------------------------------------------------------------------- mesh and config checks
    # Everything that can refuse the run does so here, before anything is written to the workdir.
    mesh = mesh or parallel.make_data_mesh()
    validate.check(config, mesh.devices.size, methods.config_rules(config.method))
    methods.get(config.method).check_config(config)
    eval_source = teachers.evaluation_source(config)
    teachers.check_available(config, workdir)
    transfer.check_configured(config)
    flat_config = _flat_config(config)
    _accept_workdir(workdir, flat_config)

    # ------------------------------------------------------------------------------------------------ workdir
    distributed.barrier("workdir accepted")  # every process has checked the workdir before process 0 writes to it
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    print(f"workdir: {os.path.abspath(workdir)}", file=sys.stderr)

    # ----------------------------------------------------------------------------------------------- teacher
    teacher, teacher_variables = teachers.prepare(config, workdir, mesh)
    teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))

    # ------------------------------------------------------------------------------------ student and method
    student = Network(*_student_parts(config, teacher))
    method = methods.build(config, teacher, student, mesh)

    # ------------------------------------------------------------------------------------------- optimizer
    plans = [method.plan(epoch) for epoch in range(config.schedule.epochs)]
    distill_epochs = sum(plan.kd_steps > 0 for plan in plans)
    kd_steps_per_epoch = max((plan.cycles * plan.kd_steps for plan in plans), default=0)
    optimizer, _ = distill.make_optimizer(config.student, kd_steps_per_epoch, distill_epochs)

    # ------------------------------------------------------------------------------------ state (or resume)
    def init_state(key):
        student_key, synth_key, rng = jax.random.split(key, 3)
        student_variables = student.init(student_key, config.student.init)
        return {"student": student_variables, "student_opt": optimizer.init(student_variables["params"]),
                **distill.init_extras_state(method, optimizer, jax.random.fold_in(key, 1)),
                "synth": method.init(synth_key), "rng": rng, "epoch": jnp.zeros((), jnp.int32),
                "kd_step": jnp.zeros((), jnp.int32)}

    key = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init_state, key)
    store = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                    sharded_paths=method.sharded_paths)
    progress_record = {"best_top1": 0.0, "budget": {}, "history": [], "config": flat_config}
    if store.latest_epoch() is not None:
        state, saved_record = store.restore(store.latest_epoch(), abstract_state, mesh)
        progress_record |= {k: v for k, v in saved_record.items() if k != "config"}
        print(f"resuming from {store.directory} after epoch {store.latest_epoch()}", file=sys.stderr)
    else:
        shardings = parallel.state_shardings(abstract_state, mesh, method.sharded_paths)
        state = jax.jit(init_state, out_shardings=shardings)(key)
    start_epoch = int(state["epoch"])
    budget = Budget(**progress_record["budget"])

    # -------------------------------------------------------------------------------------------------- steps
    student_step = jax.jit(method.make_student_step(optimizer), donate_argnums=0)
    params_finite = jax.jit(lambda trees: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in
                                                               jax.tree_util.tree_leaves(trees)] or [True])))
    writer = reporting.MetricWriter(workdir)
    with jax.default_matmul_precision("highest"):
        teacher_top1 = evaluate(teacher, teacher_variables, eval_source, mesh=mesh, progress=False)["top1"]
    print(f"{method.name}: teacher {teacher.spec.arch} {teacher_top1:.2f}% on {eval_source.description}; "
          f"student {student.spec.arch}; {mesh.devices.size} {jax.devices()[0].platform} device(s)", file=sys.stderr)

    # --------------------------------------------------------------------------------------------------- loop
    total_work = sum(plan.cycles * (plan.synthesis_steps * plan.synthesis_batch
                                    + plan.kd_steps * config.student.batch_size) for plan in plans[start_epoch:])
    progress = tqdm(total=total_work, unit="img", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                    disable=not distributed.is_main_process() or not config.progress)
    steps_this_epoch: list[tuple[str, dict]] = []  # every step's measurements, checked for NaN/Inf per epoch

    def on_step(images: int, metrics: dict, phase: str = "synthesis") -> None:
        steps_this_epoch.append((phase, metrics))
        if len(steps_this_epoch) % 10 == 0:  # wait for the device now and then so the bar shows real progress
            jax.block_until_ready(metrics)
        progress.update(images)

    result = {}
    stop = distributed.StopOnSigterm()
    stop.install()  # from here on SIGTERM means: finish this epoch, checkpoint it, exit 0
    try:
        for epoch in range(start_epoch, config.schedule.epochs):
            plan = plans[epoch]
            steps_this_epoch.clear()
            synthesis_history, kd_history = [], []
            for _ in range(plan.cycles):
                started = time.perf_counter()
                state, synthesis_metrics = method.synthesize(state, teacher_variables, epoch, on_step=on_step)
                budget.add_synthesis(time.perf_counter() - started, plan.synthesis_steps, plan.synthesis_batch)
                synthesis_history.append(synthesis_metrics)
                started = time.perf_counter()
                for _ in range(plan.kd_steps):
                    state, metrics = student_step(state, teacher_variables)
                    kd_history.append(metrics)
                    on_step(config.student.batch_size, metrics, "student")
                jax.block_until_ready(state["student"])
                budget.add_distillation(time.perf_counter() - started, plan.kd_steps, config.student.batch_size)
            state["epoch"] = jax.device_put(jnp.asarray(epoch + 1, jnp.int32), parallel.replicated(mesh))

            scalars = (_mean(synthesis_history) | mean_metrics(kd_history) | budget.rates()
                       | {"budget/seconds": budget.synthesis_seconds + budget.distill_seconds})
            problem = _first_non_finite(steps_this_epoch)
            if problem is None and not bool(params_finite((state["student"], state["extras"]))):
                problem = "the student's parameters or batch statistics"
            if problem is not None:
                writer.write(epoch + 1, scalars | {"epoch": epoch + 1})
                last = store.latest_epoch()
                raise NonFiniteError(
                    f"{problem} became non-finite in epoch {epoch + 1}; stopped before checkpointing it: "
                    + (f"the last good checkpoint (epoch {last}) in {store.directory} is untouched"
                       if last is not None else "no checkpoint had been written yet")
                    + ". Lower the learning rates or loss weights, e.g. --config.student.lr")
            last_epoch = epoch + 1 == config.schedule.epochs
            if (epoch + 1) % config.eval.every_epochs == 0 or last_epoch:
                scalars |= _evaluate_student(student, state, eval_source, mesh, teacher_top1)
                progress_record["best_top1"] = max(progress_record["best_top1"], scalars["eval/student_top1"])
                preview = method.preview(state)
                if preview is not None:
                    reporting.save_image_grid(preview, os.path.join(workdir, "images", f"epoch_{epoch + 1:04d}.png"),
                                              method.preview_columns)
            writer.write(epoch + 1, scalars | {"epoch": epoch + 1})
            shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in scalars.items()
                     if k in ("synthesis/loss", "kd/loss", "kd/agreement", "eval/student_top1")}
            progress.set_postfix(epoch=epoch + 1, **shown)
            progress_record["history"].append({k: v for k, v in scalars.items() if k.startswith("eval/")}
                                              | {"epoch": epoch + 1})
            progress_record["budget"] = budget.as_dict()
            checkpointed = (epoch + 1) % config.checkpoint.every_epochs == 0 or last_epoch
            if checkpointed:
                store.save(epoch + 1, state, progress_record)
            result = scalars
            if not last_epoch and stop.requested():  # all processes agree (one tiny collective per epoch)
                if not checkpointed:
                    store.save(epoch + 1, state, progress_record)
                raise distributed.Preempted(epoch + 1)
    finally:
        stop.uninstall()
        progress.close()
        store.close()  # waits for a checkpoint still being written, also when the run stops on an error
        writer.close()

    # ------------------------------------------------------------------------------------------------ summary
    if not result:  # resumed a finished run: evaluate what is there
        result = _evaluate_student(student, state, eval_source, mesh, teacher_top1)
    student_dir = os.path.join(workdir, "student")
    if distributed.is_main_process() and not os.path.isdir(student_dir):
        save_network(student_dir, student.spec, jax.device_get(state["student"]),
                     {"method": method.name, "teacher": teacher.spec.arch, "epochs": config.schedule.epochs})
    summary = _summary(config, method, teacher, student, teacher_top1, result, progress_record, budget, mesh,
                       method.kept_images(state)) | {"workdir": os.path.abspath(workdir)}
    summary |= transfer.run_configured(config, student, state["student"], mesh)  # {} unless config.transfer asks
    if distributed.is_main_process():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("\n" + reporting.table([(k, str(v)) for k, v in summary.items()], f"{method.name} summary"))
    print(f"workdir: {os.path.abspath(workdir)}", file=sys.stderr)
    return summary


class NonFiniteError(FloatingPointError):
    """A loss term or parameter became NaN or infinite; the message names it, the step and the epoch."""


def _first_non_finite(steps: list[tuple[str, dict]]) -> str | None:
    """'student step 12 of 40: kd/kl = nan' for the first step whose measurements are not all finite."""
    if not steps:
        return None
    values = distributed.fetch([metrics for _, metrics in steps])  # one transfer for the whole epoch
    counts: dict[str, int] = {}
    for phase, _ in steps:
        counts[phase] = counts.get(phase, 0) + 1
    seen: dict[str, int] = {}
    for (phase, _), metrics in zip(steps, values):
        seen[phase] = seen.get(phase, 0) + 1
        for name, value in metrics.items():
            if not np.all(np.isfinite(value)):
                value = float(np.asarray(value).ravel()[0])
                return f"{name} = {value} at {phase} step {seen[phase]} of {counts[phase]}"
    return None


# Fields that may change between a run and its resumption (they do not shape the train state).
RESUMABLE_CHANGES = ("progress", "eval.", "checkpoint.", "schedule.epochs", "teacher.dir", "teacher.torch_file",
                     "transfer.")


def _flat_config(config: ml_collections.ConfigDict) -> dict:
    """{"student.lr": 0.1, ...}, JSON-normalised (tuples become lists) so saved and current compare equal."""
    return json.loads(json.dumps(traverse_util.flatten_dict(config.to_dict(), sep=".")))


def _check_same_run(saved: dict, current: dict, workdir: str) -> None:
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:10])
        raise ValueError(f"{workdir} holds a run with a different config ({details}). Pass another --workdir to "
                         "start a new run, or restore those values to resume this one.")


def _accept_workdir(workdir: str, current: dict) -> None:
    """Refuse, before writing anything, a workdir whose run had another config: the newest checkpoint's (compared
    before restoring: a changed network would otherwise fail deep inside orbax) or, before the first checkpoint,
    the config.json the run wrote when it started."""
    saved_config = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_config):
        with open(saved_config) as f:
            try:
                saved = _flat_config(ml_collections.ConfigDict(json.load(f)))
            except (json.JSONDecodeError, TypeError):
                saved = None
        if saved is not None:
            _check_same_run(saved, current, workdir)
    saved_checkpoint = checkpoints.latest_metadata(os.path.join(workdir, "checkpoints"))
    if saved_checkpoint is not None:
        _check_same_run(saved_checkpoint.get("config", {}), current, workdir)


def _student_parts(config: ml_collections.ConfigDict, teacher: Network):
    """The student sees the teacher's inputs, so it shares the teacher's normalisation (as upstream does)."""
    spec = NetworkSpec(config.student.arch, teacher.spec.num_classes, dict(config.student.options),
                       mean=teacher.spec.mean, std=teacher.spec.std)
    return spec, Network.abstract(spec)[0].graphdef


def _evaluate_student(student, state, eval_source, mesh, teacher_top1) -> dict:
    with jax.default_matmul_precision("highest"):
        top1 = evaluate(student, state["student"], eval_source, mesh=mesh, progress=False)["top1"]
    return {"eval/student_top1": top1, "eval/teacher_top1": teacher_top1,
            "eval/relative_accuracy": 100.0 * top1 / teacher_top1 if teacher_top1 else 0.0}


def _mean(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d}
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


class Budget:
    """Honest accounting (methods.md §8): images made, steps taken, and wall time split by phase."""

    def __init__(self, synthesis_seconds=0.0, synthesis_image_steps=0, synthesis_steps=0,
                 distill_seconds=0.0, kd_steps=0, kd_images=0):
        self.synthesis_seconds, self.synthesis_image_steps = synthesis_seconds, synthesis_image_steps
        self.synthesis_steps = synthesis_steps
        self.distill_seconds, self.kd_steps, self.kd_images = distill_seconds, kd_steps, kd_images
        self._epoch_synthesis = [0.0, 0]
        self._epoch_distill = [0.0, 0]

    def add_synthesis(self, seconds: float, steps: int, batch: int) -> None:
        self.synthesis_seconds += seconds
        self.synthesis_steps += steps
        self.synthesis_image_steps += steps * batch
        self._epoch_synthesis = [self._epoch_synthesis[0] + seconds, self._epoch_synthesis[1] + steps * batch]

    def add_distillation(self, seconds: float, steps: int, batch: int) -> None:
        self.distill_seconds += seconds
        self.kd_steps += steps
        self.kd_images += steps * batch
        self._epoch_distill = [self._epoch_distill[0] + seconds, self._epoch_distill[1] + steps * batch]

    def rates(self) -> dict:
        """Throughput over the epoch just finished (the first epoch includes compilation)."""
        (s_seconds, s_images), (d_seconds, d_images) = self._epoch_synthesis, self._epoch_distill
        self._epoch_synthesis, self._epoch_distill = [0.0, 0], [0.0, 0]
        rates = {}
        if s_seconds > 0:
            rates["throughput/synthesis_image_steps_per_s"] = s_images / s_seconds
        if d_seconds > 0 and d_images:
            rates["throughput/kd_images_per_s"] = d_images / d_seconds
        return rates

    def as_dict(self) -> dict:
        return {"synthesis_seconds": self.synthesis_seconds, "synthesis_image_steps": self.synthesis_image_steps,
                "synthesis_steps": self.synthesis_steps, "distill_seconds": self.distill_seconds,
                "kd_steps": self.kd_steps, "kd_images": self.kd_images}


def _summary(config, method, teacher, student, teacher_top1, result, record, budget: Budget, mesh,
             kept_images: int | None) -> dict:
    top1 = result["eval/student_top1"]
    return {
        "method": method.name, "teacher": teacher.spec.arch, "student": student.spec.arch,
        "teacher_top1": round(teacher_top1, 2), "student_top1": round(top1, 2),
        "best_student_top1": round(max(record["best_top1"], top1), 2),
        "relative_accuracy": round(100.0 * top1 / teacher_top1, 2) if teacher_top1 else None,
        "epochs": config.schedule.epochs,
        "synthesis_image_steps": budget.synthesis_image_steps, "synthesis_steps": budget.synthesis_steps,
        "student_steps": budget.kd_steps, "student_batch": config.student.batch_size,
        "synthesis_seconds": round(budget.synthesis_seconds, 1), "distill_seconds": round(budget.distill_seconds, 1),
        "synthesis_image_steps_per_s": round(budget.synthesis_image_steps / max(budget.synthesis_seconds, 1e-9), 1),
        "kd_images_per_s": round(budget.kd_images / max(budget.distill_seconds, 1e-9), 1),
        "synthetic_images_kept": kept_images if kept_images is not None else "none (fresh samples each step)",
        "devices": f"{mesh.devices.size} × {jax.devices()[0].device_kind}",
    }

"""The DFKD engine end to end on tiny runs: compile once, same losses on 1 and 8 devices, kill-and-resume, outputs,
declared shardings, a toy method that uses every opening of the engine, and runs that stop on NaN."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dfkd_jax import parallel, reporting
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.network_io import load_network
from dfkd_jax.train import train_and_evaluate

from tests.conftest import REPO

METHODS = ("nayer", "deepinv", "dafl", "dfad", "cae", "cpsc", "cgdd", "mvn", "toy")


def config_path(method: str) -> str:
    """configs/<method>.py; the toy method of tests/toy_method.py is its own config file."""
    return "tests/toy_method.py" if method == "toy" else f"configs/{method}.py"


def load_config(method: str, preset: str = "digits"):
    spec = importlib.util.spec_from_file_location(f"config_{method}", REPO / config_path(method))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


# Small enough for seconds per epoch on CPU, large enough that every code path runs: warm-up then adversarial
# epochs for NAYER, several rounds, pool sampling, generator rebuilds, batches that split over 8 devices.
TINY = {
    "nayer": dict(synthesis=dict(batch_size=16, g_steps=2, g_loops=1, warmup_g_loops=2, g_life=2, ngf=8,
                                 noisy_size=16, embedding_dim=16),
                  schedule=dict(epochs=3, warmup=1, kd_steps=3)),
    "deepinv": dict(synthesis=dict(batch_size=16, g_steps=3), schedule=dict(epochs=3, kd_steps=3)),
    "dafl": dict(synthesis=dict(batch_size=16, ngf=8, nz=16), schedule=dict(epochs=3, cycles=2, kd_steps=2)),
    "dfad": dict(synthesis=dict(batch_size=16, ngf=8, nz=16), schedule=dict(epochs=3, cycles=2, kd_steps=2)),
    "toy": {},  # tests/toy_method.py's defaults are tiny already
    "cae": dict(synthesis=dict(batch_size=16, g_steps=2, g_loops=1, warmup_g_loops=2, g_life=2, ngf=8,
                               noisy_size=16, embedding_dim=16),
                schedule=dict(epochs=3, warmup=1, kd_steps=3), cncl=dict(projection_dim=8)),
    # wrn_16_2's 128-wide feature against the teacher's 64: the adapter (a trainable extra) is in the state too.
    "cpsc": dict(synthesis=dict(batch_size=16, ngf=8, nz=16, g_steps=2), student=dict(arch="wrn_16_2"),
                 schedule=dict(epochs=3, cycles=2, kd_steps=2)),
    "cgdd": dict(synthesis=dict(batch_size=16, ngf=8, nz=16, g_steps=2), schedule=dict(epochs=3, cycles=2, kd_steps=2)),
    # one synthesis epoch of two batches (the transfer set), then two distillation epochs
    "mvn": dict(synthesis=dict(batch_size=16, g_steps=2, transfer_set=32), schedule=dict(epochs=3, synthesis_epochs=1,
                                                                                       kd_steps=3)),
}


def tiny_config(method: str, teacher_dir: str, **schedule):
    config = load_config(method)
    config.teacher.source, config.teacher.dir = "converted", teacher_dir
    config.student.arch, config.student.options, config.student.batch_size = "wrn_16_1", {}, 16
    config.progress = False
    config.eval.every_epochs = 1
    for section, values in TINY[method].items():
        config[section].update(values)
    config.schedule.update(schedule)
    return config


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def student_params(workdir) -> dict:
    _, variables, _ = load_network(os.path.join(workdir, "student"))
    return jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(variables["params"]))


def restore_raw(directory: str, epoch: int | None = None) -> dict:
    """A training checkpoint's state as NumPy arrays, read without the run's abstract state."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "metadata"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    epoch = manager.latest_step() if epoch is None else epoch
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return jax.tree_util.tree_map(np.asarray, restored)


# --------------------------------------------------------------------------------------------------- compile once

@pytest.mark.parametrize("method", ["nayer", "dafl"])
def test_jitted_steps_compile_once_however_long_the_run(method, teacher_dir, tmp_path, monkeypatch):
    compiles, compiles_by_epoch = [], []
    # A program is compiled (backend_compile) or fetched from the session's persistent cache (cache_hits).
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: compiles.append(event) if "backend_compile" in event else None)
    jax.monitoring.register_event_listener(
        lambda event, **kwargs: compiles.append(event) if event.endswith("/cache_hits") else None)
    write = reporting.MetricWriter.write

    def write_and_count(self, step, scalars):
        compiles_by_epoch.append(len(compiles))
        return write(self, step, scalars)

    monkeypatch.setattr(reporting.MetricWriter, "write", write_and_count)
    train_and_evaluate(tiny_config(method, teacher_dir, epochs=5), str(tmp_path / "run"))
    # By the end of epoch 2 every program has run (NAYER: the warm-up and the adversarial generator steps, rounds,
    # rebuilds; the student step; evaluation; checkpointing). Epochs 3-5 must not compile anything new.
    assert len(compiles_by_epoch) == 5 and compiles_by_epoch[1] > 5
    assert compiles_by_epoch[4] == compiles_by_epoch[1], compiles_by_epoch


# --------------------------------------------------------------------------------------------- 1 vs 8 devices

LOSS_KEYS = ("synthesis/loss", "synthesis/bn", "synthesis/ce", "synthesis/adv", "synthesis/tv", "synthesis/l2",
             "synthesis/activation", "synthesis/balance", "synthesis/best_loss", "kd/loss", "kd/kl", "kd/l1",
             "kd/head_ce", "kd/stage_gap", "kd/cncl", "synthesis/kd", "synthesis/ikd", "synthesis/supcon", "kd/kd",
             "kd/ikd", "kd/ce", "kd/at", "synthesis/target_kl")
# One step per phase, so the first epoch's measurements are single steps from the same initial state.
ONE_STEP = {
    "nayer": dict(synthesis=dict(g_steps=1, g_loops=1, warmup_g_loops=1), schedule=dict(epochs=3, kd_steps=1)),
    "deepinv": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, kd_steps=1)),
    "dafl": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, cycles=1, kd_steps=1)),
    "dfad": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, cycles=1, kd_steps=1)),
    "toy": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, kd_steps=1)),
    "cae": dict(synthesis=dict(g_steps=1, g_loops=1, warmup_g_loops=1), schedule=dict(epochs=3, kd_steps=1)),
    "cpsc": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, cycles=1, kd_steps=1)),
    "cgdd": dict(synthesis=dict(g_steps=1), schedule=dict(epochs=3, cycles=1, kd_steps=1)),
    "mvn": dict(synthesis=dict(g_steps=1, transfer_set=16), schedule=dict(epochs=3, synthesis_epochs=1, kd_steps=1)),
}


@pytest.mark.parametrize("method", METHODS)
def test_one_and_eight_devices_give_the_same_losses(method, teacher_dir, tmp_path):
    assert jax.device_count() == 8
    metrics = {}
    for devices in (1, 8):
        config = tiny_config(method, teacher_dir)
        for section, values in ONE_STEP[method].items():
            config[section].update(values)
        config.pool.dtype = "float32"  # no 8-bit rounding to turn float noise into whole grey levels
        workdir = str(tmp_path / f"devices{devices}")
        train_and_evaluate(config, workdir, mesh=parallel.make_data_mesh(jax.devices()[:devices]))
        metrics[devices] = read_metrics(workdir)
    compared = 0
    for epoch, (epoch_1, epoch_8) in enumerate(zip(metrics[1], metrics[8], strict=True)):
        for key in LOSS_KEYS:
            if key in epoch_1:
                # The first synthesis step (same initial state, no update yet) agrees to float precision. After
                # that the runs drift apart: Adam's first update is ±lr·sign(g), so float noise in near-zero
                # gradients becomes full-size steps, and generator and student feed the difference back to each
                # other. Per-device BatchNorm statistics or a wrongly sharded batch break the first bound by far.
                first_synthesis_step = epoch == 0 and key.startswith("synthesis/")
                tolerance = 1e-5 if first_synthesis_step else 1e-3 if epoch == 0 else 1e-2
                np.testing.assert_allclose(epoch_8[key], epoch_1[key], rtol=tolerance, atol=tolerance,
                                           err_msg=f"epoch {epoch + 1} {key}")
                compared += 1
    assert compared >= 6


# -------------------------------------------------------------------------------------------- kill and resume

def _main_command(method: str, teacher_dir: str, workdir: str) -> list[str]:
    overrides = {"teacher.source": "converted", "teacher.dir": teacher_dir, "student.arch": "wrn_16_1",
                 "student.options": "{}", "student.batch_size": 16, "progress": False, "schedule.epochs": 5}
    overrides |= {f"{section}.{key}": value for section, values in TINY[method].items() for key, value in values.items()
                  if key != "epochs"}
    if method in ("nayer", "cae"):
        overrides |= {"schedule.warmup": 1, "schedule.kd_steps": 3, "synthesis.g_steps": 2, "synthesis.g_loops": 1,
                      "synthesis.warmup_g_loops": 2}
    return [sys.executable, "-m", "dfkd_jax.main", f"--config={config_path(method)}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


# CAE: a head in the extras, a labelled pool sampled in label pairs; CPSC: an adapter in the extras, no pool; CGDD:
# a conditional generator alternating with the student, labels in the student step; MVN: synthesis-only epochs, then
# distillation from a transfer set with its soft targets
@pytest.mark.parametrize("method", ["nayer", "cae", "cpsc", "cgdd", "mvn"])
def test_a_killed_run_resumes_to_the_same_student(method, teacher_dir, tmp_path):
    uninterrupted = str(tmp_path / "uninterrupted")
    completed = subprocess.run(_main_command(method, teacher_dir, uninterrupted), cwd=REPO, capture_output=True,
                               text=True)
    assert completed.returncode == 0, completed.stderr

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(_main_command(method, teacher_dir, killed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, "checkpoints", "2")) and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.isdir(os.path.join(killed, "student")), "the run finished before it could be killed"

    resumed = subprocess.run(_main_command(method, teacher_dir, killed), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    jax.tree_util.tree_map(np.testing.assert_array_equal, student_params(killed), student_params(uninterrupted))
    final = {name: restore_raw(os.path.join(name, "checkpoints")) for name in (killed, uninterrupted)}
    jax.tree_util.tree_map(np.testing.assert_array_equal, final[killed]["extras"], final[uninterrupted]["extras"])
    # the method's whole state: generator(s), optimizer states, the pool where there is one
    jax.tree_util.tree_map(np.testing.assert_array_equal, final[killed]["synth"], final[uninterrupted]["synth"])


# ----------------------------------------------------------------------------------------- what a user sees

def test_a_run_leaves_config_metrics_tensorboard_images_and_a_summary(teacher_dir, tmp_path, capfd):
    workdir = tmp_path / "run"
    summary = train_and_evaluate(tiny_config("nayer", teacher_dir), str(workdir))
    said = capfd.readouterr().err.splitlines()
    assert said[0] == f"workdir: {workdir}" and said[-1] == f"workdir: {workdir}"  # at the start and at the end
    assert summary["workdir"] == str(workdir)
    assert json.loads((workdir / "config.json").read_text())["method"] == "nayer"
    metrics = read_metrics(workdir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for key in ("synthesis/bn", "synthesis/ce", "kd/kl", "kd/agreement", "kd/lr", "eval/student_top1",
                "eval/relative_accuracy", "throughput/synthesis_image_steps_per_s"):
        assert key in metrics[-1], key
    assert "synthesis/adv" not in metrics[0] and "synthesis/adv" in metrics[-1]  # warm-up epoch has no adversary
    assert list((workdir / "tensorboard").iterdir()), "no TensorBoard event file"
    assert sorted(p.name for p in (workdir / "images").iterdir()) == [f"epoch_{e:04d}.png" for e in (1, 2, 3)]
    # NAYER: 2 warm-up rounds + 1 round in each of 2 epochs, one 16-image batch kept per round.
    assert summary["synthetic_images_kept"] == (2 + 1 + 1) * 16
    assert summary["synthesis_image_steps"] == (2 + 1 + 1) * 2 * 16
    assert summary["student_steps"] == 2 * 3
    # Relative accuracy from the unrounded top-1s (the summary's top-1s are rounded to 0.01 for reading).
    last = metrics[-1]
    assert last["eval/relative_accuracy"] == pytest.approx(
        100 * last["eval/student_top1"] / last["eval/teacher_top1"], rel=1e-9)
    assert summary["relative_accuracy"] == round(last["eval/relative_accuracy"], 2)

    # The workdir now holds a finished run: a different config is refused instead of mixed in, and nothing in the
    # workdir changes (config.json included).
    before = _tree_digest(workdir)
    changed = tiny_config("nayer", teacher_dir)
    changed.student.arch = "wrn_16_2"
    with pytest.raises(ValueError, match=r"different config \(student.arch: 'wrn_16_1' -> 'wrn_16_2'\)"):
        train_and_evaluate(changed, str(workdir))
    assert _tree_digest(workdir) == before


# ------------------------------------------------------------------------------ a new method, trainer untouched

def test_a_toy_method_with_a_head_labels_stages_and_a_conditional_generator_runs_unchanged(teacher_dir, tmp_path):
    """tests/toy_method.py adds a method the way the seed methods will be added: nothing in train.py or distill.py
    knows about it. Its head trains, is checkpointed and stays out of student/; its pool keeps the generator's
    labels; its student step writes its own state; its loss reads the stage outputs."""
    config = tiny_config("toy", teacher_dir)
    workdir = tmp_path / "toy"
    train_and_evaluate(config, str(workdir))
    metrics = read_metrics(workdir)
    for key in ("kd/head_ce", "kd/stage_gap", "kd/kl", "synthesis/ce"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert metrics[-1]["kd/head_ce"] < metrics[0]["kd/head_ce"]  # the head learns the labels it is given

    state = restore_raw(str(workdir / "checkpoints"))
    from tests import toy_method
    teacher, teacher_variables, _ = load_network(teacher_dir)
    fresh = toy_method.Toy(config, teacher, Network.abstract(NetworkSpec("wrn_16_1", 10))[0], parallel.make_data_mesh())
    initial_head = jax.tree_util.tree_map(np.asarray, fresh.init_extras(jax.random.fold_in(jax.random.PRNGKey(0), 1)))
    assert set(state["extras"]) == {"w1", "b1", "w2"}
    assert not np.allclose(state["extras"]["w1"], initial_head["w1"])  # trained with the student
    # ... and not exported: student/ holds exactly the student network's parameters.
    exported = student_params(workdir)
    _, abstract = Network.abstract(NetworkSpec("wrn_16_1", 10))
    assert jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(
        nnx.to_pure_dict(abstract["params"]))
    # The pool holds labels in range for every image kept (3 epochs × 16), -1 where nothing was written.
    labels = state["synth"]["pool"]["labels"]
    kept = int(state["synth"]["pool"]["count"])
    assert kept == 48 and np.all((labels[:kept] >= 0) & (labels[:kept] < 10)) and np.all(labels[kept:] == -1)
    # The student step counted every image it trained on: 3 epochs × 3 steps × 16.
    assert int(state["synth"]["seen"].sum()) == 3 * 3 * 16


# ---------------------------------------------------------------------------------------- declared shardings

def batch_leaves_left_replicated(method_name: str, config, teacher_dir: str) -> list[str]:
    """Leaves of the method's state whose leading axis is a batch (the synthesis or student batch, or the pool's
    capacity) but which the method's declaration leaves replicated."""
    from dfkd_jax import methods
    teacher, _, _ = load_network(teacher_dir)
    student = Network.abstract(NetworkSpec(config.student.arch, 10))[0]
    mesh = parallel.make_data_mesh()
    method = methods.build(config, teacher, student, mesh)
    state = {"synth": jax.eval_shape(method.init, jax.random.key(0))}
    batch_sizes = {config.synthesis.batch_size, config.student.batch_size}
    batch_sizes |= {leaf.shape[0] for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                    if "pool" in parallel.leaf_path(path) and leaf.ndim >= 1}
    shardings = parallel.state_shardings(state, mesh, method.sharded_paths)
    return [parallel.leaf_path(path) for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(state),
                                                                      jax.tree_util.tree_leaves(shardings))
            if leaf.ndim >= 1 and leaf.shape[0] in batch_sizes and sharding.is_fully_replicated]


@pytest.mark.parametrize("method", METHODS)
def test_every_state_leaf_with_a_batch_axis_is_declared_batch_sharded(method, teacher_dir):
    config = tiny_config(method, teacher_dir)
    # Sizes no parameter has (the tiny networks' widths are 8-64), so a leading axis of this size is a batch.
    config.synthesis.batch_size, config.student.batch_size = 40, 24
    assert batch_leaves_left_replicated(method, config, teacher_dir) == []


def test_the_sharding_check_catches_a_method_that_forgets_a_leaf(teacher_dir, monkeypatch):
    from dfkd_jax.methods.nayer import Nayer
    monkeypatch.setattr(Nayer, "batch_sharded", ("pool",))  # forgets round/targets and round/best_images
    config = tiny_config("nayer", teacher_dir)
    config.synthesis.batch_size, config.student.batch_size = 40, 24
    assert sorted(batch_leaves_left_replicated("nayer", config, teacher_dir)) == ["synth/round/best_images",
                                                                                 "synth/round/targets"]


# --------------------------------------------------------------------------------------------- NaN and refusal

def test_a_nan_stops_the_run_naming_the_step_the_term_and_the_epoch(teacher_dir, tmp_path, monkeypatch):
    from dfkd_jax import distill
    from dfkd_jax.train import NonFiniteError

    clean_update = distill.make_kd_update

    def poisoned_update(method, optimizer):  # from the 5th student step on, the loss the step reports is NaN
        update = clean_update(method, optimizer)

        def kd_update(state, images, teacher_variables, batch=None):
            new_state, loss, measurements = update(state, images, teacher_variables, batch)
            return new_state, jnp.where(state["kd_step"] >= 4, jnp.nan, loss), measurements

        return kd_update

    monkeypatch.setattr(distill, "make_kd_update", poisoned_update)
    workdir = tmp_path / "run"
    # NAYER tiny: epoch 1 is warm-up (no student steps); epochs 2 and 3 take student steps 0-2 and 3-5.
    with pytest.raises(NonFiniteError, match=r"kd/loss = nan at student step 2 of 3 became non-finite in epoch 3; "
                                             r"stopped before checkpointing it: the last good checkpoint \(epoch 2\)"):
        train_and_evaluate(tiny_config("nayer", teacher_dir), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert restore_raw(str(workdir / "checkpoints"), 2)["epoch"] == 2  # the last good one restores
    assert not (workdir / "student").exists()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kd/loss"] is None  # NaN is written as null: every line stays valid JSON


def _tree_digest(directory) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(pathlib.Path(directory).rglob("*")) if path.is_file()}


def test_a_refused_resume_leaves_the_workdir_byte_for_byte(teacher_dir, tmp_path):
    # Before the first checkpoint: only config.json (a run killed while converting its teacher, say).
    workdir = tmp_path / "started"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny_config("nayer", teacher_dir).to_json_best_effort(indent=2))
    before = _tree_digest(workdir)
    changed = tiny_config("nayer", teacher_dir)
    changed.synthesis.lr = 1e-3
    with pytest.raises(ValueError, match=r"different config \(synthesis.lr: 0.004 -> 0.001\)"):
        train_and_evaluate(changed, str(workdir))
    assert _tree_digest(workdir) == before

    # An out-of-range value is refused before the workdir is even created.
    fresh = tmp_path / "fresh"
    bad = tiny_config("nayer", teacher_dir)
    bad.student.lr = -1.0
    with pytest.raises(ValueError, match=r"config.student.lr = -1.0 is out of range: it must be a number > 0"):
        train_and_evaluate(bad, str(fresh))
    assert not fresh.exists()

"""What `python -m dfkd_jax.main` runs, chosen by `config.job`."""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections

from dfkd_jax import convert, distributed, parallel, validate
from dfkd_jax.data.sources import open_source
from dfkd_jax.evaluate import evaluate
from dfkd_jax.network_io import load_network


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not distributed.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2) + "\n")


def teacher(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Convert the configured PyTorch teacher into WORKDIR/teacher (once, by process 0) and report its top-1 (the
    evaluation split over all processes)."""
    mesh = parallel.make_data_mesh()
    validate.check(config, mesh.devices.size)
    source = open_source(config.eval.data, config.eval.split, config.eval.data_dir)  # missing data: fail first
    teacher_dir = os.path.join(workdir, "teacher")
    converted_earlier = os.path.isdir(teacher_dir)
    distributed.barrier("teacher job: workdir checked")  # every process has looked before process 0 writes
    if converted_earlier:  # refuse a workdir holding another teacher before writing anything
        network, variables, metadata = load_network(teacher_dir)
        if network.spec.arch != config.teacher.arch:
            raise ValueError(f"{teacher_dir} holds a {network.spec.arch}, but the config asks for "
                             f"{config.teacher.arch}; pass another --workdir.")
        write_config(config, workdir)
        print(f"using the teacher converted earlier in {teacher_dir}", file=sys.stderr)
    else:
        write_config(config, workdir)
        if distributed.is_main_process():
            convert.main(["--torch", config.teacher.torch_file, "--arch", config.teacher.arch, "--out", teacher_dir,
                          "--normalisation", config.teacher.normalisation])
        distributed.barrier("teacher job: converted")
        network, variables, metadata = load_network(teacher_dir)
    print(f"evaluating on {source.description}, {mesh.devices.size} {jax.devices()[0].platform} device(s)",
          file=sys.stderr)
    with jax.default_matmul_precision("highest"):
        result = evaluate(network, variables, source, mesh=mesh,
                          batch_size=parallel.round_up_to_devices(config.eval.batch_size, mesh))
    summary = {"teacher": metadata["provenance"].get("torch_file"), "arch": network.spec.arch,
               **network.spec.options, "data": source.description, "top1": round(result["top1"], 4),
               "correct": result["correct"], "n": result["n"]}
    if distributed.is_main_process():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(f"\n{network.spec.arch} top-1 {result['top1']:.2f}% ({result['correct']}/{result['n']}); "
          f"results in {os.path.join(workdir, 'results.json')}")
    print(json.dumps({"top1": summary["top1"], "n": summary["n"]}))
    return summary


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """A data-free distillation run (dfkd_jax.train); prints the summary's headline numbers as JSON last."""
    from dfkd_jax.train import train_and_evaluate

    summary = train_and_evaluate(config, workdir)
    print(json.dumps({k: summary[k] for k in ("method", "teacher_top1", "student_top1", "relative_accuracy")}))
    return summary


JOBS = {"teacher": teacher, "train": train}


def run(config: ml_collections.ConfigDict, workdir: str):
    if config.job not in JOBS:
        raise ValueError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
    return JOBS[config.job](config, workdir)

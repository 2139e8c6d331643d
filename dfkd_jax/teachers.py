"""Where a run's teacher and its evaluation images come from (`config.teacher.source`):

- `digits`: the embedded default. A teacher the project trains itself, once, on scikit-learn's handwritten digits
  (shipped inside the installed package); evaluation on the held-out digits. Needs no files at all.
- `torch`: a PyTorch checkpoint, converted once into WORKDIR/teacher.
- `converted`: a directory written by `python -m dfkd_jax.convert`.

The teacher is made or converted once and stored as a network checkpoint in the workdir; training checkpoints never
contain it. In a multi-process run process 0 writes it (the digits teacher is trained by all processes together, over
the global mesh) and every process reads it once it is there.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from dfkd_jax import convert, distributed
from dfkd_jax.data.sources import ImageSource, open_source
from dfkd_jax.models import Network, NetworkSpec, Variables
from dfkd_jax.network_io import load_network, save_network
from dfkd_jax.validate import ConfigError

SOURCES = ("digits", "torch", "converted")


def check_available(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fail on a missing teacher before the run writes anything."""
    teacher = config.teacher
    if teacher.source not in SOURCES:
        raise ConfigError(f"config.teacher.source = {teacher.source!r} is not a teacher source: it must be one of "
                          f"{', '.join(SOURCES)}")
    if teacher.source == "converted" and not os.path.isdir(teacher.dir):
        raise FileNotFoundError(f"config.teacher.dir = {teacher.dir!r} holds no converted teacher; write one with "
                                "python -m dfkd_jax.convert --torch FILE --arch ARCH --out DIR")
    if (teacher.source == "torch" and not os.path.isdir(os.path.join(workdir, "teacher"))
            and not os.path.isfile(teacher.torch_file)):
        raise FileNotFoundError(f"no teacher checkpoint at {teacher.torch_file} (config.teacher.torch_file): put the "
                                "file there, pass teacher_root=DIR in the preset, or "
                                "--config.teacher.torch_file=PATH")


def prepare(config: ml_collections.ConfigDict, workdir: str, mesh) -> tuple[Network, Variables]:
    teacher = config.teacher
    check_available(config, workdir)
    teacher_dir = os.path.join(workdir, "teacher")
    made_earlier = os.path.isdir(teacher_dir)
    distributed.barrier("teacher: workdir checked")  # every process has looked before process 0 writes
    if teacher.source == "converted":
        teacher_dir = teacher.dir
    elif made_earlier:
        print(f"using the teacher made earlier in {teacher_dir}", file=sys.stderr)
    elif teacher.source == "torch":
        normalisation = (["--mean", ",".join(map(str, teacher.mean)), "--std", ",".join(map(str, teacher.std))]
                         if teacher.get("mean") else ["--normalisation", teacher.normalisation])
        if distributed.is_main_process():
            convert.main(["--torch", teacher.torch_file, "--arch", teacher.arch, "--out", teacher_dir,
                          *normalisation])
    else:
        _train_digits_teacher(config, teacher_dir, mesh)
    distributed.barrier("teacher: ready")
    network, variables, _ = load_network(teacher_dir)
    if network.spec.arch != teacher.arch:
        raise ValueError(f"{teacher_dir} holds a {network.spec.arch}, but config.teacher.arch is {teacher.arch}; "
                         "pass another --workdir or fix the config.")
    return network, variables


def evaluation_source(config: ml_collections.ConfigDict) -> ImageSource:
    if config.eval.data == "digits":
        from dfkd_jax.data.digits import load_digits_split
        return load_digits_split(image_size=config.data.image_shape[0])[1]
    return open_source(config.eval.data, config.eval.split, config.eval.data_dir)


def _train_digits_teacher(config: ml_collections.ConfigDict, teacher_dir: str, mesh) -> None:
    from dfkd_jax.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_split
    from dfkd_jax.supervised import train_classifier

    train, _ = load_digits_split(image_size=config.data.image_shape[0])
    spec = NetworkSpec(config.teacher.arch, 10, dict(config.teacher.options), mean=DIGITS_MEAN, std=DIGITS_STD)
    print(f"training the embedded teacher: {spec.arch} on {train.description}", file=sys.stderr)
    variables = train_classifier(spec, train, epochs=config.teacher.train_epochs,
                                 batch_size=config.teacher.train_batch_size,
                                 learning_rate=config.teacher.train_lr, seed=config.seed, mesh=mesh, flip=False,
                                 progress=distributed.is_main_process())
    if distributed.is_main_process():
        save_network(teacher_dir, spec, variables, {"trained_on": train.description,
                                                    "epochs": config.teacher.train_epochs})

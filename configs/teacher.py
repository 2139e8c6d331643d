"""Convert a published PyTorch CIFAR-10 teacher into Flax and measure its top-1 on lossless test images.

    python -m dfkd_jax.main --config=configs/teacher.py                       # akamaster resnet56
    python -m dfkd_jax.main --config=configs/teacher.py:chenyaofo_resnet20 --workdir=/tmp/teacher

Presets (the files in ../shared/teachers): akamaster_resnet{20,32,44,56}, chenyaofo_resnet{20,32,44,56}.
Hardware: any; about 15 s on 2 CPU cores. Expected top-1 on shared/data/cifar10_test_exact932.npz
(shared/data/README.md): akamaster 91.63 / 93.03 / 93.45 / 92.60, chenyaofo 92.38 / 93.24 / 94.21 / 94.53.
The converted teacher is written to WORKDIR/teacher (kept: a second run only evaluates).
"""

import ml_collections

SHARED = "../shared"
TEACHERS = {
    **{f"akamaster_resnet{d}": (f"{SHARED}/teachers/akamaster/resnet{d}-{tag}.th", f"resnet{d}", "imagenet")
       for d, tag in [(20, "12fca82f"), (32, "d509ac18"), (44, "014dd654"), (56, "4bfd9763")]},
    **{f"chenyaofo_resnet{d}": (f"{SHARED}/teachers/chenyaofo/cifar10_resnet{d}.pth", f"resnet{d}", "cifar10")
       for d in (20, 32, 44, 56)},
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "akamaster_resnet56"
    if preset not in TEACHERS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(TEACHERS)}")
    torch_file, arch, normalisation = TEACHERS[preset]

    config = ml_collections.ConfigDict()
    config.job = "teacher"
    config.name = f"teacher_{preset}"

    config.teacher = ml_collections.ConfigDict()
    config.teacher.torch_file = torch_file  # PyTorch checkpoint, converted once into WORKDIR/teacher
    config.teacher.arch = arch
    config.teacher.normalisation = normalisation  # cifar10 | cifar100 | imagenet (akamaster: imagenet)

    config.eval = ml_collections.ConfigDict()
    config.eval.data = f"{SHARED}/data/cifar10_test_exact932.npz"  # .npz with x, y; or a tfds name
    config.eval.split = "test"
    config.eval.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    config.eval.batch_size = 512
    return config

"""The same networks on both sides: the PyTorch teacher from its original file, the Flax one converted from it by
the project's converter; a PyTorch student and generator with fresh weights, converted to Flax the same way; and
the JAX method objects (the trainer's own pure steps) built from the method configs in `configs/`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.torch_steps import Normalize
from dfkd_jax import convert, methods, parallel, presets
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.models import zoo

REPO = pathlib.Path(__file__).resolve().parents[1]


def torch_network(arch: str, num_classes: int, options: dict) -> torch.nn.Module:
    family = zoo.get(arch).family
    if family == "he_resnet":
        depth = int(arch[len("resnet"):])
        return (torch_models.AkamasterResNet if options.get("shortcut", "A") == "A"
                else torch_models.ChenyaofoResNet)(depth, num_classes)
    return torch_models.ZOO[arch](num_classes)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().to(torch.float32).numpy().copy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def load_teacher(torch_file: str, arch: str, normalisation: str = "imagenet"):
    """(PyTorch raw network taking normalised NCHW input, its mean/std, Flax Network, variables), both read from the
    original checkpoint file (the Flax one through `dfkd_jax.convert`)."""
    mean, std = convert.NORMALISATIONS[normalisation]
    spec, variables = convert.convert(torch_file, arch, mean=mean, std=std)
    raw = torch_network(arch, spec.num_classes, spec.options)
    raw.load_state_dict({k: torch.from_numpy(v) for k, v in convert.read_state_dict(torch_file).items()},
                        strict=False)  # num_batches_tracked is not needed in eval mode
    network = Network(spec, Network.abstract(spec)[0].graphdef)
    return raw.eval(), spec, network, variables


def fresh_student(arch: str, teacher_spec: NetworkSpec, seed: int = 0):
    """A PyTorch student with PyTorch's initialisation and the same weights in Flax (shortcut A for He ResNets)."""
    options = {"shortcut": "A"} if zoo.get(arch).family == "he_resnet" else {}
    torch.manual_seed(seed)
    raw = torch_network(arch, teacher_spec.num_classes, options)
    spec = NetworkSpec(arch, teacher_spec.num_classes, options, mean=teacher_spec.mean, std=teacher_spec.std)
    variables = convert.state_dict_to_variables(state_dict_numpy(raw), Network.abstract(spec)[1],
                                                f"the PyTorch {arch} student")
    return raw, Network(spec, Network.abstract(spec)[0].graphdef), variables


def with_normalisation(raw: torch.nn.Module, spec: NetworkSpec) -> torch.nn.Module:
    """Images in [0, 1] in, as the Flax networks take them; BN hooks still find the raw network's layers."""
    return torch.nn.Sequential(Normalize(spec.mean, spec.std), raw)


def method_config(method: str, **overrides) -> ml_collections.ConfigDict:
    """configs/<method>.py with the cifar10 preset (the upstream defaults), then `overrides` (nested dicts)."""
    spec = importlib.util.spec_from_file_location(f"configs_{method}", REPO / "configs" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("cifar10")
    presets.merge(config, overrides)
    return config


def build_method(config: ml_collections.ConfigDict, teacher: Network, student: Network, mesh=None):
    return methods.build(config, teacher, student, mesh or parallel.make_data_mesh())


def torch_nayer_generator(config: ml_collections.ConfigDict, embeddings: np.ndarray, num_classes: int,
                          image_shape: tuple[int, int, int], seed: int = 0) -> torch.nn.Module:
    """NAYER's PyTorch NLGenerator for `config.synthesis`, noisy layer re-initialised as each round starts."""
    synthesis = config.synthesis
    torch.manual_seed(seed)
    model = torch_models.NLGenerator(
        ngf=synthesis.ngf, img_size=image_shape[0], nc=image_shape[2], nl=num_classes,
        label_emb=torch.from_numpy(np.asarray(embeddings, np.float32)), le_emb_size=synthesis.noisy_size,
        le_size=embeddings.shape[1], sbz=synthesis.batch_size)
    model.re_init_le()
    return model


def nayer_generator_pair(method, seed: int = 0):
    """The PyTorch generator above with the method's own label embedding, and the same weights as variables of the
    Flax generator the method uses."""
    model = torch_nayer_generator(method.config, np.asarray(method.embeddings), method.num_classes,
                                  method.image_shape, seed)
    abstract = jax.eval_shape(method.generator.init, jax.random.key(0))
    variables = convert.state_dict_to_variables(state_dict_numpy(model), abstract, "the PyTorch NAYER generator")
    return model, variables

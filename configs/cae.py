"""CAE-DFKD (Category-Aware Embedding DFKD, arXiv 2504.21478, DAC 2025): NAYER with category embedding noise
diffusion (CEND) at the generator's input and a category noise contrastive loss (CNCL) on the student's embedding.

    python -m dfkd_jax.main --config=configs/cae.py                       # embedded default: digits, no files
        # expected (2 CPU cores, fresh workdir): student 94.7% of 450 held-out digits (teacher 98.7%), 2m07s
    python -m dfkd_jax.main --config=configs/cae.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 37.7% ± 0.1 on exact932 (seeds 0, 1: 37.77, 37.66; NAYER 37.4), 11m30s-13m
    python -m dfkd_jax.main --config=configs/cae.py:cifar10             # NAYER's CIFAR-10 schedule, 120 epochs
    python -m dfkd_jax.main --config=configs/cae.py:cifar100            # CIFAR-100 (chenyaofo resnet56 teacher)

Ablations, same schedule and seeds (README "CAE-DFKD"):
    --config.cend.enabled=False                 NAYER + CNCL
    --config.cncl.weight=0                      NAYER + CEND
    --config.cend.enabled=False --config.cncl.weight=0 --config.pool.sampling=uniform   = NAYER exactly (tested;
        with a batch that is not a multiple of 2K also --config.cncl.views=1, or its targets differ)

Everything NAYER does is as configs/nayer.py says (its docstring lists the upstream behaviour kept and the flags),
with NAYER's budgets. No code of CAE-DFKD exists; what methods.md §4 gives and what is decided here:
- CEND (config.cend): e_{n,c} = e_c + M_n ⊙ q_n on NAYER's label embeddings (CLIP ViT-B/32 text embeddings for
  CIFAR, a random orthogonal matrix for digits, any K×D .npy via config.data.label_embedding_file), N = 4 sources
  [decided, methods.md]: gaussian N(0, 1), uniform U(−1, 1), laplace Laplace(0, 1), bernoulli ±1 (a dropout-style
  mask (m − 0.5)·2) (cend.sources); M_n a learnable per-dimension magnitude vector per source, init 0.1
  (cend.init_magnitude, cend.learnable), trained by the generator's Adam and rebuilt with the generator every
  g_life epochs; each sample draws its source uniformly (cend.assign="random"; "cycle" = sample i gets source
  i mod N). [decided] A fresh draw at every generator step (cend.redraw="step"; "round" keeps one draw per round).
  NAYER's noisy layer is kept.
- CNCL (config.cncl): [decided, methods.md] SupCon (Khosla et al. eq. 2) over the student's penultimate feature
  through a projection head, ℓ2-normalised, with the labels the images were made for; temperature 0.1
  (cncl.temperature), weight λ = 1 (cncl.weight); two noise views per target label in every synthesis batch
  (cncl.views: targets for B/2 samples, repeated, each view with its own noise draw; group ids in the pool).
  [decided] The head is Linear(D, D) → ReLU → Linear(D, 128) (cncl.hidden_dim, 0 = the feature width D;
  cncl.projection_dim), PyTorch's default initialisation, trained by the student's SGD and schedule, never
  exported with the student. Positives are all other images of the anchor's class in the batch; an anchor with
  none is left out of the mean; no τ/τ_base factor. Student batches are sampled so that every label appears at
  least twice (pool.sampling="label_pairs"), one crop + flip per image.
- Generator loss: NAYER's 10·BN + 0.5·CE + 1.33·adv; student loss KL_τ (τ = 20) + λ·CNCL.
"""

import copy
import importlib.util
import os

from dfkd_jax import presets

_spec = importlib.util.spec_from_file_location("configs_nayer", os.path.join(os.path.dirname(__file__), "nayer.py"))
nayer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nayer)

DEFAULTS = copy.deepcopy(nayer.DEFAULTS) | dict(
    cend=dict(enabled=True, sources=("gaussian", "uniform", "laplace", "bernoulli"), init_magnitude=0.1,
              learnable=True, assign="random", redraw="step"),
    cncl=dict(weight=1.0, temperature=0.1, views=2, hidden_dim=0, projection_dim=128),
    pool=dict(sampling="label_pairs"),
)

BUDGETS = copy.deepcopy(nayer.BUDGETS)  # paper (NAYER's CIFAR schedule), cpu20, digits


def get_config(arg=None):
    return presets.base_config("cae", arg, DEFAULTS, BUDGETS)

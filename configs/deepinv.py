"""DeepInversion (Yin et al., CVPR 2020) as run by the CMI codebase: pixels optimised against the teacher.

    python -m dfkd_jax.main --config=configs/deepinv.py                 # embedded default: digits
        # expected (2 CPU cores, fresh workdir): student 96.7% (teacher 98.7%), 2m20s
    python -m dfkd_jax.main --config=configs/deepinv.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 16.1% (teacher 92.6%), 10m16s (measured before the student-init change)
    python -m dfkd_jax.main --config=configs/deepinv.py:cifar10         # DeepInv-2k, 200 epochs

Defaults: CMI's scripts/deepinv_cifar10.sh with methods.md's 2k steps per batch: batch 256, Adam 0.1 (0.5, 0.99) on
pixels initialised N(0, 1) in normalised space, loss 10·BN + CE + adv(−JS, τ = 3) + 0.001·TV (+ 0·L2), jitter ±4 and
flip; one batch per epoch into the pool, then 400 student steps of 256; SGD 0.1 with cosine annealing to 0 over the
200 epochs, τ = 20.
- Total variation (config.synthesis.tv_norm): "l1" = Σ over the four neighbour differences of mean |Δ|, what CMI's
  `criterions.get_image_prior_losses` returns and its DeepInversion runs at weight 0.001; "l2" = the Frobenius-norm
  form of NVIDIA's DeepInversion (`loss_var_l2`), about 1000× larger on a noise batch.
- Student schedule: CMI's current `datafree_kd.py` anneals with CosineAnnealingLR(T_max=epochs) for every method;
  its first release used ×0.1 at 120/150/180 of 200 epochs (--config.student.schedule=multistep).
Budgets and their measured results are in README.md ("Distillation runs").
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=256, g_steps=2000, lr=0.1, betas=(0.5, 0.99), bn_weight=10.0, ce_weight=1.0,
                   adv_weight=1.0, adv_temperature=3.0, tv_weight=1e-3, tv_norm="l1", l2_weight=0.0),
    schedule=dict(epochs=200, warmup=0, kd_steps=400, cycles=1),
    student=dict(batch_size=256, lr=0.1, schedule="cosine", eta_min=0.0, temperature=20.0),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20): 6 batches of 60 pixel steps.
    "cpu20": dict(synthesis=dict(batch_size=128, g_steps=60), schedule=dict(epochs=6, kd_steps=50),
                  student=dict(batch_size=128)),
    "digits": dict(synthesis=dict(batch_size=100, g_steps=60), schedule=dict(epochs=10, kd_steps=40),
                   student=dict(batch_size=128), eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    return presets.base_config("deepinv", arg, DEFAULTS, BUDGETS)

"""DFAD (Fang et al., 2019): a generator and the student play an adversarial game on the L1 gap of their logits.

    python -m dfkd_jax.main --config=configs/dfad.py                  # embedded default: digits
        # expected (2 CPU cores, fresh workdir): student 64.9% (teacher 98.7%), 1m52s
    python -m dfkd_jax.main --config=configs/dfad.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 11.3% (near chance; see README), 21m (measured before the engine issue)
    python -m dfkd_jax.main --config=configs/dfad.py:cifar10          # 200 epochs

Defaults: CMI's scripts/dfad_cifar10.sh as first released (commit 3f791f9: DCGAN-small with nz = 256, Adam 1e-3
(0.5, 0.999), per epoch 80 × (1 generator step, 5 student steps) of 256, SGD 0.1 ×0.1 at 60/75/90% of 200 epochs,
`--T 1`); the generator maximises mean|t − s| and the student minimises it: CMI's `datafree_kd.py` sets
`criterion = torch.nn.L1Loss()` for DFAD (the DFAD paper's MAE). config.student.loss = "kl" distils with KL at
config.student.temperature instead. CMI's later revision anneals with cosine and uses a LargeGenerator; not
followed here. Budgets and their measured results are in README.md.
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=256, nz=256, ngf=64, g_steps=1, lr=1e-3, betas=(0.5, 0.999), ce_weight=0.0,
                   activation_weight=0.0, balance_weight=0.0, balance_log_base=0.0, adv_weight=1.0,
                   adversarial="l1", bn_weight=0.0, standardise_output=False),
    schedule=dict(epochs=200, warmup=0, kd_steps=5, cycles=80),
    student=dict(batch_size=256, lr=0.1, schedule="multistep", milestones=(0.6, 0.75, 0.9), temperature=1.0,
                 loss="l1"),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20).
    "cpu20": dict(synthesis=dict(batch_size=128), schedule=dict(epochs=8, cycles=10),
                  student=dict(batch_size=128)),
    # A constant learning rate: with the step decay the generator finds a region the slowed student no longer
    # follows (measured: 90% at epoch 6, 38% at epoch 10).
    "digits": dict(synthesis=dict(batch_size=128, ngf=32), schedule=dict(epochs=8, cycles=10),
                   student=dict(batch_size=128, schedule="constant"), eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    return presets.base_config("dfad", arg, DEFAULTS, BUDGETS)

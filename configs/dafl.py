"""DAFL (Chen et al., ICCV 2019): a persistent generator trained so the teacher is confident, active and balanced.

    python -m dfkd_jax.main --config=configs/dafl.py                  # embedded default: digits
        # expected (2 CPU cores, fresh workdir): student 92.0% (teacher 98.7%), 1m51s
    python -m dfkd_jax.main --config=configs/dafl.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 11.3%, best 14.0% (near chance; see README), 10m06s (before the student-init change)
    python -m dfkd_jax.main --config=configs/dafl.py:cifar10          # 200 epochs

Defaults: CMI's generative synthesizer and schedule as first released (commit 3f791f9: DCGAN-small with nz = 512,
Adam 1e-3 (0.5, 0.999), per epoch 80 × (1 generator step, 5 student steps) of 256, SGD 0.1 ×0.1 at 60/75/90% of 200
epochs) with methods.md's DAFL weights: CE(t, argmax t) + 0.1·activation + 5·information entropy (log10, as DAFL's
code). The student trains on fresh generator samples, no pool.
- Student loss: KL at τ = 1 (config.student.temperature). CMI's `datafree_kd.py` replaces its KLDiv(T=args.T) by
  KLDiv() (τ = 1) for DAFL/ZSKT/DFQ, whatever --T says; --config.student.temperature=20 gives the τ of the
  CMI/Fast/NAYER family. CMI's later revision anneals every method with cosine and gives DAFL/DFAD a larger
  generator (LargeGenerator); not followed here.
- [decided] As DAFL's own generator (last layer BatchNorm2d(affine=False)), each output channel is standardised
  over the batch and the teacher sees that as its normalised input (config.synthesis.standardise_output; the
  DCGAN-small's sigmoid stands in for DAFL's tanh, equal after the standardisation up to the nonlinearity's
  shape). Without it the student stays at chance (measured).
Budgets and their measured results are in README.md ("Distillation runs").
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=256, nz=512, ngf=64, g_steps=1, lr=1e-3, betas=(0.5, 0.999), ce_weight=1.0,
                   activation_weight=0.1, balance_weight=5.0, balance_log_base=10.0, adv_weight=0.0,
                   adversarial="l1", bn_weight=0.0, standardise_output=True),
    schedule=dict(epochs=200, warmup=0, kd_steps=5, cycles=80),
    student=dict(batch_size=256, lr=0.1, schedule="multistep", milestones=(0.6, 0.75, 0.9), temperature=1.0,
                 loss="kl"),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20).
    "cpu20": dict(synthesis=dict(batch_size=128), schedule=dict(epochs=8, cycles=11),
                  student=dict(batch_size=128)),
    "digits": dict(synthesis=dict(batch_size=128, ngf=32), schedule=dict(epochs=8, cycles=10),
                   student=dict(batch_size=128), eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    return presets.base_config("dafl", arg, DEFAULTS, BUDGETS)

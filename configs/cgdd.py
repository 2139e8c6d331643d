"""CGDD (Yan et al., arXiv 2112.15358): a class-conditional generator against the student, the preset labels as
ground truth for the student, and attention transfer (methods.md §6; dfkd_jax/methods/cgdd.py).

    python -m dfkd_jax.main --config=configs/cgdd.py                        # embedded default: digits
        # expected (2 CPU cores, fresh workdir): student 94.0% of 450 held-out digits (teacher 98.7%), 1m16s
    python -m dfkd_jax.main --config=configs/cgdd.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 26.2% on exact932 (teacher 92.6%), 16m
    python -m dfkd_jax.main --config=configs/cgdd.py:cifar10                # 200 epochs

The paper has no public code and its text gives the terms, not their weights or schedule: every value below is
[decided] (methods.md §6), each a field:
- Generator: DCGAN-small fed z ⊙ E[y], E a K×nz label embedding (synthesis.nz = 256, ngf = 64), Adam 1e-3
  (0.5, 0.999), as DFAD's in CMI; preset labels uniform over the classes, fresh every step.
- L_G = ce·CE(t, y) + bn·BN − adv·mean|t − s|: cgdd.ce_weight = 1, cgdd.bn_weight = 1 (CPSC-DFKD's β, the nearest
  conditional generator with code), cgdd.adv_weight = 1 (DFAD's L1 at its weight); the student is in train mode
  during the generator step, as in DFAD.
- L_S = KL_τ(s, t) + ce_S·CE(s, y) + β/2·Σ_j AT_j: τ = 4 (student.temperature, with τ²), cgdd.student_ce_weight = 1,
  β = cgdd.at_weight = 1000 with the AT form of Zagoruyko & Komodakis's code, the mean squared difference of the
  normalised maps (cgdd.at_form = "code"; "paper" = eq. 2's ℓ2 norm, for which β = 1000 would be far too large);
  AT at the end of every residual stage, the larger map average-pooled where sizes differ.
- Schedule: per epoch 50 iterations of 5 generator steps then 5 student steps (DFAD's alternation), batch 256 for
  both; student SGD 0.1, momentum 0.9, weight decay 5e-4, cosine to 0 over 200 epochs (the CMI family's).
No pool: the student trains on fresh samples. Budgets and their measured results are in README.md.
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=256, nz=256, ngf=64, g_steps=5, lr=1e-3, betas=(0.5, 0.999)),
    cgdd=dict(ce_weight=1.0, bn_weight=1.0, adv_weight=1.0, student_ce_weight=1.0, at_weight=1000.0,
              at_form="code"),
    schedule=dict(epochs=200, warmup=0, kd_steps=5, cycles=50),
    student=dict(batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", eta_min=0.0,
                 temperature=4.0),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20).
    "cpu20": dict(synthesis=dict(batch_size=128), schedule=dict(epochs=8, cycles=8), student=dict(batch_size=128)),
    # The embedded default: under 5 minutes on 2 CPU cores, teacher training included.
    "digits": dict(synthesis=dict(batch_size=64, ngf=32), schedule=dict(epochs=8, cycles=8),
                   student=dict(batch_size=64), eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    return presets.base_config("cgdd", arg, DEFAULTS, BUDGETS)

"""CPSC-DFKD (Shao, Zhang, Wang, Pattern Recognition 2023): a class-conditional generator against the student, with
pseudo-supervised contrast between student and teacher features (methods.md §5; dfkd_jax/methods/cpsc.py).

    python -m dfkd_jax.main --config=configs/cpsc.py                        # embedded default: digits, faithful
        # expected (2 CPU cores, fresh workdir): student 97.8% of 450 held-out digits (teacher 98.7%), 1m31s
    python -m dfkd_jax.main --config=configs/cpsc.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 25.6% on exact932 (teacher 92.6%), 13m42s
    python -m dfkd_jax.main --config=configs/cpsc.py:cifar10,budget=cpu20,eval=shared,variant=clean
        # expected: resnet20 20.2% (best 20.5%), about 14m alone
    python -m dfkd_jax.main --config=configs/cpsc.py:cifar10                 # the authors' 600 epochs
    python -m dfkd_jax.main --config=configs/cpsc.py:cifar100                # IKD in its plain (MSE) form

Defaults are the authors' `CPSC_DFKD.py` with the values methods.md §5 gives: per epoch 50 iterations of 6 generator
steps and 5 student steps, batch 512 for both; generator Adam lr 1e-3 (0.5, 0.999), z ∈ R^256, ngf 64, conditional
BN ε = 1e-3; student SGD lr 0.1, momentum 0.9, weight decay 5e-4; α = 5 (IKD), β = 1 (BN), γ = 0.7 (SupCon,
τ = 0.07), η = 0.7 (CE); KD at τ = 1 without τ²; 600 epochs. No pool: the student trains on fresh samples.

Presets: a dataset and a budget as every method (`dfkd_jax/presets.py`), and `variant=`:
- `variant=faithful` (default): what the code does, quirks included: a new Adam for every generator step
  (synthesis.reset_adam_every_step = True), the generator's MultiStepLR never applying
  (synthesis.lr_schedule_applies = False), both CE terms on softmax probabilities (cpsc.ce_on_probabilities = True),
  and the student's rate as its two schedulers produce it together (student.schedule = "cpsc_upstream": 0.01·e for
  epochs 1–10, an odd epoch 11, then 0.05·(1 + cos(π(e − 10)/600))).
- `variant=clean`: one Adam state across generator steps, the generator's ×0.1 at epochs 50 and 150
  (synthesis.lr_milestones), CE on logits, and the intended 10-epoch linear warm-up then cosine to 0
  ("warmup_cosine").
Upstream runs its forward passes under fp16 autocast on GPU; here float32.

Decisions where the code gives no answer:
- IKD's form (cpsc.ikd_form): the code takes −log MSE / log ‖t − s‖₂ on CIFAR-10 and −MSE / MSE elsewhere; "log"
  for digits too [decided: 10 classes like CIFAR-10], "plain" for CIFAR-100.
- The adapter for a student whose feature width differs from the teacher's (upstream: only its wrn_16_1 / wrn_40_1
  students): whenever the widths differ; never trained, as upstream (methods/cpsc.py).
- Budgets below 600 epochs scale the warm-up to 1 epoch (student.warmup_epochs) [decided: 10 of 600 epochs upstream].
Budgets and their measured results are in README.md ("Distillation runs").
"""

from dfkd_jax import presets
from dfkd_jax.validate import ConfigError

DEFAULTS = dict(
    synthesis=dict(batch_size=512, nz=256, ngf=64, g_steps=6, lr=1e-3, betas=(0.5, 0.999), cbn_epsilon=1e-3,
                   reset_adam_every_step=True, lr_schedule_applies=False, lr_milestones=(50, 150)),
    cpsc=dict(ikd_weight=5.0, bn_weight=1.0, supcon_weight=0.7, ce_weight=0.7, supcon_temperature=0.07,
              ikd_form="log", ce_on_probabilities=True),
    schedule=dict(epochs=600, warmup=0, kd_steps=5, cycles=50),
    student=dict(batch_size=512, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cpsc_upstream",
                 warmup_epochs=10, eta_min=0.0, temperature=1.0),
)

VARIANTS = {
    "faithful": {},
    "clean": dict(synthesis=dict(reset_adam_every_step=False, lr_schedule_applies=True),
                  cpsc=dict(ce_on_probabilities=False), student=dict(schedule="warmup_cosine")),
}

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20).
    "cpu20": dict(synthesis=dict(batch_size=64), schedule=dict(epochs=12, cycles=8),
                  student=dict(batch_size=64, warmup_epochs=1)),
    # The embedded default: under 5 minutes on 2 CPU cores, teacher training included.
    "digits": dict(synthesis=dict(batch_size=64, ngf=32), schedule=dict(epochs=8, cycles=10),
                   student=dict(batch_size=64, warmup_epochs=1), eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    tokens = [token for token in (arg or "").split(",") if token]
    variant = "faithful"
    for token in [t for t in tokens if t.startswith("variant=")]:
        variant = token.split("=", 1)[1]
        tokens.remove(token)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)} (variant=...)")
    rest = ",".join(tokens)
    config = presets.base_config("cpsc", rest, DEFAULTS, BUDGETS)
    if presets.parse_preset(rest, BUDGETS)["dataset"] == "cifar100":
        config.cpsc.ikd_form = "plain"  # the code's form for every dataset but CIFAR-10
    presets.merge(config, VARIANTS[variant])
    config.name += f"_{variant}"
    return config

"""MVN soft-targeted transfer-set synthesis (Zi Wang, AAAI 2021): soft targets sampled from a multivariate normal
model of the teacher's feature space, pixels optimised until the teacher gives them those targets, then KD on that
fixed transfer set (methods.md §7; dfkd_jax/methods/mvn.py).

    python -m dfkd_jax.main --config=configs/mvn.py                      # embedded default: digits
        # expected (2 CPU cores, fresh workdir): student 95.8% of 450 held-out digits (teacher 98.7%), 1m27s
    python -m dfkd_jax.main --config=configs/mvn.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 16.7% (best 19.9%) on exact932 (teacher 92.6%), about 17m alone
    python -m dfkd_jax.main --config=configs/mvn.py:cifar10              # the paper's 40,000 images, 1500 steps each

Defaults (methods.md §7; no code exists, so every value not in the paper's digest is [decided]):
- Feature model: W (K × d) and b of the teacher's classifier (the Dense layer the zoo names `linear`, `fc` or
  `classifier`; Flax's kernel is Wᵀ). R_ij = cosine similarity of columns i, j of W (d × d: how the classifier uses
  feature dimensions i and j together); Σ = σ²·R + εI with σ = 2.0 (mvn.sigma) and ε = 1e-3 (mvn.epsilon; R has rank
  ≤ K < d, so ε makes Σ invertible); R, Σ and its Cholesky factor L computed once, in float64 on the host.
- μ = 0 (mvn.mean = "zero") [decided]: in the zoo's ResNets the classifier's input is the global average of a ReLU
  output with no BatchNorm directly before the classifier, so no statistics in the teacher give the features' mean
  (methods.md's alternative, the mean a BN before the classifier implies, does not apply to them; the zoo's WRNs do
  have BN → ReLU → pool there, an option not implemented). The true mean is positive, but only the soft targets
  W f + b are used, never f itself.
- Features f = μ + L·z, z ~ N(0, I_d), one joint draw per image (no per-class sampling); soft targets
  y = softmax((W f + b)/τ), τ = 20 (mvn.temperature); the image's pool label is argmax y, and y itself is kept beside
  it (the method state's `soft_targets`, checkpointed with the pool).
- Synthesis: pixels in image space [decided]: the variable is the [0, 1] image the networks take (they normalise
  inside), so the uniform [0, 1] initialisation and the clip to [0, 1] after every step [decided] are the literal
  box and the pool stores the variable itself. Batch 256, 1500 Adam steps at lr 0.05, betas (0.9, 0.999) [decided:
  PyTorch's defaults, the digest gives none], a fresh Adam per batch, on
      L = τ²·CE(softmax(T(x)/τ), y) + λ_a·(−mean |f_T(x)|),   λ_a = 0.1 (mvn.activation_weight).
  The τ² (mvn.ce_temperature_squared = True) [decided] is KD's: the CE's gradient w.r.t. the logits is (p − y)/τ, so
  without it the matching term is 400× weaker at τ = 20 and the activation term would dominate.
- The final images are kept, not the lowest-loss ones [decided]: there is no random augmentation, so the objective is
  deterministic and falls step after step (measured: 930 → 753 → 747 → 744 over 1, 30, 60, 200 steps on resnet56);
  no jitter or flip during synthesis [decided: the paper is silent].
- Transfer set: synthesis.transfer_set images rounded up to whole batches (40,000 → 157 × 256 = 40,192) [decided],
  spread over the first schedule.synthesis_epochs epochs (20: 7–8 batches each, a checkpoint after each epoch)
  [decided]; those epochs train no student.
- Student: the remaining 200 epochs [decided: one pass over the set each, kd_steps = 157 of batch 256], KL_τ(s, t)
  at τ = 20 on crop + flip draws of the pool, SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine to 0 over the
  distillation epochs only. The pool is float32 [decided: the set as optimised; 8-bit files are the CMI family's
  storage, not this paper's] and sampled shuffled without replacement [decided: epochs over a fixed set, as a
  data loader would].
- Budgets [decided]: `cpu20` makes 12 batches of 128 × 60 steps (1,536 images; 60 steps bring the KL to the targets
  from 0.47 to 0.012 on resnet56) in 3 epochs, then 12 epochs of 72 student steps of 128 (6 passes each); `digits`
  10 batches of 100 × 60 steps in 2 epochs, then 10 epochs of 40 steps of 128.
Reported by the paper's digest: CIFAR-10 ResNet-34 → ResNet-18 93.31%; MNIST LeNet-5 → LeNet-5-half 99.08%.
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=256, g_steps=1500, lr=0.05, betas=(0.9, 0.999), transfer_set=40_000),
    mvn=dict(sigma=2.0, epsilon=1e-3, mean="zero", temperature=20.0, activation_weight=0.1,
             ce_temperature_squared=True),
    # 20 epochs that only synthesise (157 batches, 7-8 per epoch), then 200 epochs of one pass over the set each.
    schedule=dict(epochs=220, synthesis_epochs=20, kd_steps=157, warmup=0, cycles=1),
    student=dict(batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", eta_min=0.0,
                 temperature=20.0),
    pool=dict(dtype="float32", sampling="shuffled"),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20).
    # Measured rates: 250 image-steps/s of synthesis, 180 student images/s (about 6 + 10 minutes).
    "cpu20": dict(synthesis=dict(batch_size=128, g_steps=60, transfer_set=1536),
                  schedule=dict(epochs=15, synthesis_epochs=3, kd_steps=72), student=dict(batch_size=128)),
    # The embedded default: under 5 minutes on 2 CPU cores, teacher training included.
    "digits": dict(synthesis=dict(batch_size=100, g_steps=60, transfer_set=1000),
                   schedule=dict(epochs=12, synthesis_epochs=2, kd_steps=40), student=dict(batch_size=128),
                   eval=dict(every_epochs=2)),
}


def get_config(arg=None):
    return presets.base_config("mvn", arg, DEFAULTS, BUDGETS)

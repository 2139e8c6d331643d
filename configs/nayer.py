"""NAYER (Tran et al., CVPR 2024): label-embedding generator with a re-initialised noisy layer, pool of best batches.

    python -m dfkd_jax.main --config=configs/nayer.py                 # embedded default: digits, no files needed
        # expected (2 CPU cores, fresh workdir): student 90.7% of 450 held-out digits (teacher 98.7%), 2m08s
    python -m dfkd_jax.main --config=configs/nayer.py:cifar10,budget=cpu20,eval=shared
        # expected: resnet20 34.9% ± 4.3 on exact932 (teacher 92.6%; seeds 0-2: 38.1, 36.7, 30.0), about 11m30s
    python -m dfkd_jax.main --config=configs/nayer.py:cifar10         # the paper's NAYER-100 schedule

Defaults are upstream's CIFAR-10 script (scripts/nayer_100.sh): synthesis batch 400, 30 generator steps per round,
Adam 4e-3 (0.5, 0.999), loss 10·BN(momentum 0.9) + 0.5·CE + 1.33·adv, 2 rounds per epoch (10 in the 20 warm-up
epochs), generator rebuilt every 10 epochs, 400 student steps of 512 per epoch, SGD 0.2 cosine to 2e-4, τ = 20,
120 epochs.

- Label embedding (config.data.label_embedding_file): the CIFAR-10/100 presets use upstream's own CLIP ViT-B/32
  text embeddings of "a image of {class}" (../shared/data/label_embeddings, 512-d); any K×D .npy can be given.
  [decided] Without a file (digits) a fixed random orthogonal K×512 matrix seeded by config.seed
  (config.synthesis.embedding_dim; a file's width overrides it).
- Student mode during synthesis (config.synthesis.student_train_from_second_round, default True = upstream):
  `synthesize()` puts the student in eval mode, and `student.train()` at the end of each round leaves it in train
  mode for the next, so from the second round of an epoch on the adversarial term sees batch statistics and moves
  the student's running statistics. False: eval mode throughout (this project's behaviour before).
- Best batch: upstream's `best_cost` is reset by the first step of every round (`or best_inputs is None`), so each
  round keeps its own lowest-loss batch; same here.
- Student initialisation (config.student.init, default "upstream"): as the student's layout's own PyTorch code does
  (akamaster's resnet20: kaiming_normal_ fan-in on convs and the Linear; models/layers.py INITS lists every
  family); "kaiming_fan_out" is the single scheme this project used before for every family.
- Pool sampling (config.pool.sampling): upstream draws each student batch from a DataLoader reshuffled for every
  pass and rebuilt after every round, without replacement, with a short last batch. "uniform" (default, the fast
  path) draws with replacement; "shuffled" is upstream's order without replacement, its short batch dropped to
  keep one compiled shape.
- Read against upstream once more and unchanged: augmentation (crop 32 with padding 4, flip, then the teacher's
  normalisation) on the generator's output before teacher and student; the BN-statistics EMA updated after each
  round from its last step's batch; the adversarial term and distillation from epoch `warmup` on; cosine over
  epochs − warmup, stepped after each distillation epoch.
Budgets and their measured results are in README.md ("Distillation runs").
"""

from dfkd_jax import presets

DEFAULTS = dict(
    synthesis=dict(batch_size=400, g_steps=30, lr=4e-3, betas=(0.5, 0.999), bn_weight=10.0, ce_weight=0.5,
                   adv_weight=1.33, bn_momentum=0.9, g_life=10, g_loops=2, warmup_g_loops=10, noisy_size=1000,
                   ngf=64, embedding_dim=512, student_train_from_second_round=True),
    schedule=dict(epochs=120, warmup=20, kd_steps=400, cycles=1),
    student=dict(batch_size=512, lr=0.2, momentum=0.9, weight_decay=1e-4, schedule="cosine", eta_min=2e-4,
                 temperature=20.0),
)

BUDGETS = {
    "paper": {},
    # About 20 minutes on 2 CPU cores (akamaster resnet56 -> resnet20); a half-width generator (ngf 32): at full
    # width it costs as much as the teacher per image on CPU.
    "cpu20": dict(synthesis=dict(batch_size=100, g_steps=15, warmup_g_loops=6, g_loops=2, g_life=5, ngf=32),
                  schedule=dict(epochs=9, warmup=1, kd_steps=45), student=dict(batch_size=128, lr=0.1)),
    # The embedded default: under 5 minutes on 2 CPU cores, teacher training included.
    "digits": dict(synthesis=dict(batch_size=100, g_steps=20, warmup_g_loops=4, g_loops=2, g_life=3, ngf=32,
                                  noisy_size=256),
                   schedule=dict(epochs=6, warmup=1, kd_steps=40), student=dict(batch_size=128, lr=0.1),
                   eval=dict(every_epochs=3)),
}


def get_config(arg=None):
    return presets.base_config("nayer", arg, DEFAULTS, BUDGETS)

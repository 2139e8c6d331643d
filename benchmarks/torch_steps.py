"""The PyTorch side of the benchmark and of the parity tests: eager PyTorch, structured as the upstream DFKD code is.

- `DeepInversionHook`: a forward hook on each of the teacher's BatchNorm layers computing the BN-statistics term
  (CMI / Fast / NAYER `datafree/hooks.py`, with NAYER's momentum variant);
- `NayerGeneratorStep`: NAYER's inner synthesis loop body (`synthesizer.synthesize`): generator forward, augmentation
  on the tensor, teacher (and student) forward, 10·BN + 0.5·CE + 1.33·adv, Adam step on the generator;
- `PixelStep`: CMI's DeepInversion synthesizer loop body: jitter + flip, teacher/student forward, BN + CE + adv(JS) +
  TV + L2, Adam step on the pixels, clip;
- `KDStep`: the student step of NAYER/CMI `train`: augmented pool batch, teacher under no_grad, KL(τ) + SGD.

Augmentation draws are explicit arguments (`CropFlipDraw`, `JitterDraw`), so the JAX side can be given the same
ones; the benchmark draws them once per step like kornia / torchvision would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class CropFlipDraw(NamedTuple):
    offsets: torch.Tensor  # (B, 2) int64 top-left (row, col) in the 4-pixel zero-padded image
    flips: torch.Tensor  # (B,) bool


class JitterDraw(NamedTuple):
    shift: tuple[int, int]  # circular shift along (rows, cols)
    flip: bool


def crop_flip(images_bchw: torch.Tensor, draw: CropFlipDraw, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip on the tensor, one draw per image (kornia's on-device
    augmentation in NAYER; torchvision's per-image transforms in the student's loader), as one gather."""
    b, _, h, w = images_bchw.shape
    padded = F.pad(images_bchw, (padding, padding, padding, padding))
    rows = draw.offsets[:, 0, None] + torch.arange(h)  # (B, H)
    cols = draw.offsets[:, 1, None] + torch.arange(w)  # (B, W)
    batch = torch.arange(b)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(draw.flips[:, None, None, None], cropped.flip(3), cropped)


def jitter_flip(images_bchw: torch.Tensor, draw: JitterDraw) -> torch.Tensor:
    """DeepInversion's augmentation: one roll and one flip decision for the whole batch."""
    rolled = torch.roll(images_bchw, shifts=draw.shift, dims=(2, 3))
    return rolled.flip(3) if draw.flip else rolled


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class DeepInversionHook:
    """Upstream `DeepInversionHook`: ‖running_var − σ²‖₂ + ‖running_mean − μ‖₂ of the layer's input (biased σ²),
    against (1−m)·batch + m·EMA once `update_mmt` has been called (NAYER / Fast)."""

    def __init__(self, module: nn.BatchNorm2d, mmt_rate: float = 0.0):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.mmt_rate = mmt_rate
        self.mmt = None
        self.tmp_val = None
        self.r_feature = None

    def hook_fn(self, module, inputs, output):
        nch = inputs[0].shape[1]
        mean = inputs[0].mean([0, 2, 3])
        var = inputs[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        if self.mmt is None:
            r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)
        else:
            mean_mmt, var_mmt = self.mmt
            r_feature = (torch.norm(module.running_var.data - (1 - self.mmt_rate) * var - self.mmt_rate * var_mmt, 2)
                         + torch.norm(module.running_mean.data - (1 - self.mmt_rate) * mean
                                      - self.mmt_rate * mean_mmt, 2))
        self.r_feature = r_feature
        self.tmp_val = (mean, var)

    def update_mmt(self):
        mean, var = self.tmp_val
        if self.mmt is None:
            self.mmt = (mean.data, var.data)
        else:
            mean_mmt, var_mmt = self.mmt
            self.mmt = (self.mmt_rate * mean_mmt + (1 - self.mmt_rate) * mean.data,
                        self.mmt_rate * var_mmt + (1 - self.mmt_rate) * var.data)

    def remove(self):
        self.hook.remove()


def bn_hooks(network: nn.Module, mmt_rate: float = 0.0) -> list[DeepInversionHook]:
    return [DeepInversionHook(m, mmt_rate) for m in network.modules() if isinstance(m, nn.BatchNorm2d)]


def kldiv(logits, targets, T=1.0, reduction="batchmean"):
    """Upstream `datafree.criterions.kldiv`."""
    q = F.log_softmax(logits / T, dim=1)
    p = F.softmax(targets / T, dim=1)
    return F.kl_div(q, p, reduction=reduction) * (T * T)


def jsdiv(logits, targets, T=1.0, reduction="batchmean"):
    """Upstream `datafree.criterions.jsdiv`: ½·KL(M‖P) + ½·KL(M‖Q) with P, Q, M clamped to [0.01, 0.99]."""
    P = F.softmax(logits / T, dim=1)
    Q = F.softmax(targets / T, dim=1)
    M = 0.5 * (P + Q)
    P = torch.clamp(P, 0.01, 0.99)
    Q = torch.clamp(Q, 0.01, 0.99)
    M = torch.clamp(M, 0.01, 0.99)
    return 0.5 * F.kl_div(torch.log(P), M, reduction=reduction) + 0.5 * F.kl_div(torch.log(Q), M, reduction=reduction)


def image_prior_tv(inputs_jit):
    """CMI's `datafree.criterions.get_image_prior_losses`, what its DeepInversion runs: the l1 form."""
    diff1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
    diff2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
    diff3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
    diff4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    loss_var_l1 = loss_var_l1 * 255.0
    return loss_var_l1


class NayerGeneratorStep:
    """One NAYER generator step. `teacher` and `student` take images in [0, 1] (normalisation inside)."""

    def __init__(self, generator, teacher, student, *, lr=4e-3, betas=(0.5, 0.999), bn_weight=10.0, ce_weight=0.5,
                 adv_weight=1.33, bn_momentum=0.9):
        self.generator, self.teacher, self.student = generator, teacher, student
        self.weights = (bn_weight, ce_weight, adv_weight)
        self.hooks = bn_hooks(teacher, bn_momentum)
        self.optimizer = torch.optim.Adam(generator.parameters(), lr, betas=betas)
        teacher.eval()
        student.eval()
        generator.train()

    def __call__(self, targets: torch.Tensor, draw: CropFlipDraw, adversarial: bool = True):
        bn_weight, ce_weight, adv_weight = self.weights
        inputs = self.generator(targets=targets)
        inputs_aug = crop_flip(inputs, draw)
        t_out = self.teacher(inputs_aug)
        loss_bn = sum(h.r_feature for h in self.hooks)
        loss_oh = F.cross_entropy(t_out, targets)
        terms = {"bn": loss_bn, "ce": loss_oh}
        loss = bn_weight * loss_bn + ce_weight * loss_oh
        if adversarial and adv_weight > 0:
            s_out = self.student(inputs_aug)
            mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
            loss_adv = -(kldiv(s_out, t_out, reduction="none").sum(1) * mask).mean()
            terms["adv"] = loss_adv
            loss = loss + adv_weight * loss_adv
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss, terms, inputs.detach()


class PixelStep:
    """One DeepInversion pixel step (CMI's `DeepInvSyn`). `teacher_raw` / `student_raw` take normalised images;
    `pixels` live in the normalised space."""

    def __init__(self, pixels, teacher_raw, student_raw, mean, std, *, lr=0.1, betas=(0.5, 0.99), bn_weight=10.0,
                 ce_weight=1.0, adv_weight=0.0, tv_weight=1e-3, l2_weight=0.0, adv_temperature=3.0):
        self.pixels = pixels.requires_grad_(True)
        self.teacher, self.student = teacher_raw, student_raw
        self.weights = dict(bn=bn_weight, ce=ce_weight, adv=adv_weight, tv=tv_weight, l2=l2_weight)
        self.adv_temperature = adv_temperature
        self.hooks = bn_hooks(teacher_raw)
        self.optimizer = torch.optim.Adam([self.pixels], lr, betas=betas)
        mean = torch.tensor(mean).view(1, -1, 1, 1)
        std = torch.tensor(std).view(1, -1, 1, 1)
        self.low, self.high = -mean / std, (1 - mean) / std
        teacher_raw.eval()
        student_raw.eval()

    def __call__(self, targets: torch.Tensor, draw: JitterDraw):
        inputs_aug = jitter_flip(self.pixels, draw)
        t_out = self.teacher(inputs_aug)
        terms = {"bn": sum(h.r_feature for h in self.hooks), "ce": F.cross_entropy(t_out, targets),
                 "tv": image_prior_tv(self.pixels), "l2": torch.norm(self.pixels, 2)}
        if self.weights["adv"] > 0:
            s_out = self.student(inputs_aug)
            terms["adv"] = -jsdiv(s_out, t_out, T=self.adv_temperature)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # upstream `clip_images`
            self.pixels.data = torch.max(torch.min(self.pixels.data, self.high), self.low)
        return loss, terms


class KDStep:
    """One student step on a synthetic batch. `teacher` and `student` take images in [0, 1]."""

    def __init__(self, teacher, student, *, lr=0.1, momentum=0.9, weight_decay=1e-4, temperature=20.0):
        self.teacher, self.student = teacher, student
        self.temperature = temperature
        self.optimizer = torch.optim.SGD(student.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
        teacher.eval()
        student.train()

    def __call__(self, images: torch.Tensor, draw: CropFlipDraw):
        images = crop_flip(images, draw)
        with torch.no_grad():
            t_out = self.teacher(images)
        s_out = self.student(images.detach())
        loss = kldiv(s_out, t_out.detach(), T=self.temperature)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss

"""CPSC-DFKD's training step in PyTorch, written the way the authors' `CPSC_DFKD.py` is (its modules, its loss
functions and their order of operations), float32, as the reference for tests/test_cpsc.py.

- `GeneratorD` with `CategoricalConditionalBatchNorm2d` (network/gan.py, network/conditional_batchnorm.py);
- `SupConLoss` (metric/loss.py, Tian's SupCon code with contrast_mode "all"), `kdloss` (metric/loss.py) and
  `DeepInversionFeatureHook` (metric/DeepInversion.py);
- `OutFeature`: a network whose `forward(x, out_feature=True)` returns (F.normalize(penultimate), logits) as their
  networks do, the penultimate feature read off the classifier's input;
- `CpscSteps.generator_step` / `student_step`: the two loop bodies of `train()`, with the random draws (z, labels)
  passed in so the JAX side can be given the same ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flax import nnx


# --------------------------------------------------------------------------------------------- the generator

class ConditionalBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-03, momentum=0.1, affine=False, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def forward(self, input, weight, bias, **kwargs):
        exponential_average_factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            exponential_average_factor = self.momentum
        output = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                              self.training or not self.track_running_stats, exponential_average_factor, self.eps)
        size = output.size()
        weight = weight.unsqueeze(-1).unsqueeze(-1).expand(size)
        bias = bias.unsqueeze(-1).unsqueeze(-1).expand(size)
        return weight * output + bias


class CategoricalConditionalBatchNorm2d(ConditionalBatchNorm2d):
    def __init__(self, num_classes, num_features, eps=1e-3, momentum=0.1, affine=False, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.weights = nn.Embedding(num_classes, num_features)
        self.biases = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weights.weight.data)
        nn.init.zeros_(self.biases.weight.data)

    def forward(self, input, c, **kwargs):
        return super().forward(input, self.weights(c), self.biases(c))


class GeneratorD(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=1, img_size=32, num_classes=10):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks0_0 = CategoricalConditionalBatchNorm2d(num_classes, ngf * 2)
        self.conv_blocks1_0 = nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1)
        self.conv_blocks1_1 = CategoricalConditionalBatchNorm2d(num_classes, ngf * 2)
        self.conv_blocks1_2 = nn.LeakyReLU(0.2, inplace=True)
        self.conv_blocks2_0 = nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1)
        self.conv_blocks2_1 = CategoricalConditionalBatchNorm2d(num_classes, ngf)
        self.conv_blocks2_2 = nn.LeakyReLU(0.2, inplace=True)
        self.conv_blocks3_0 = nn.Conv2d(ngf, nc, 3, stride=1, padding=1)
        self.conv_blocks3_1 = nn.Tanh()
        self.conv_blocks3_2 = CategoricalConditionalBatchNorm2d(num_classes, nc)

    def forward(self, z, labels):
        out = self.l1(z.view(z.shape[0], -1))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        img = self.conv_blocks0_0(out, labels)
        img = nn.functional.interpolate(img, scale_factor=2)
        img = self.conv_blocks1_0(img)
        img = self.conv_blocks1_1(img, labels)
        img = self.conv_blocks1_2(img)
        img = nn.functional.interpolate(img, scale_factor=2)
        img = self.conv_blocks2_0(img)
        img = self.conv_blocks2_1(img, labels)
        img = self.conv_blocks2_2(img)
        img = self.conv_blocks3_0(img)
        img = self.conv_blocks3_1(img)
        return self.conv_blocks3_2(img, labels)


# Upstream module name -> index in CPSCGenerator.conv_blocks (parameter-free steps are plain functions there).
_CBN = {"conv_blocks0_0": 0, "conv_blocks1_1": 3, "conv_blocks2_1": 7, "conv_blocks3_2": 11}
_CONV = {"conv_blocks1_0": 2, "conv_blocks2_0": 6, "conv_blocks3_0": 9}


def generator_arrays(named: dict[str, np.ndarray]) -> dict:
    """GeneratorD's state_dict (or gradients by parameter name) as CPSCGenerator's pure dicts
    {"params": ..., "batch_stats": ...}: convs OIHW -> HWIO, linears (out, in) -> (in, out)."""
    params, stats = {"conv_blocks": {}, "l1": {0: {"kernel": named["l1.0.weight"].T, "bias": named["l1.0.bias"]}}}, {
        "conv_blocks": {}}
    for name, index in _CBN.items():
        params["conv_blocks"][index] = {"scale": named[f"{name}.weights.weight"],
                                        "bias": named[f"{name}.biases.weight"]}
        if f"{name}.running_mean" in named:
            stats["conv_blocks"][index] = {"norm": {"mean": named[f"{name}.running_mean"],
                                                    "var": named[f"{name}.running_var"]}}
    for name, index in _CONV.items():
        params["conv_blocks"][index] = {"kernel": named[f"{name}.weight"].transpose(2, 3, 1, 0),
                                        "bias": named[f"{name}.bias"]}
    return {"params": params, "batch_stats": stats}


def generator_variables(generator: GeneratorD, like: dict) -> dict:
    """The PyTorch generator's weights and running statistics as variables shaped like `like`."""
    arrays = generator_arrays({k: v.detach().to(torch.float32).numpy().copy()
                               for k, v in generator.state_dict().items() if not k.endswith("num_batches_tracked")})
    variables = jax.tree_util.tree_map(lambda x: x, like)
    for collection in ("params", "batch_stats"):
        nnx.replace_by_pure_dict(variables[collection],
                                 jax.tree_util.tree_map(jnp.asarray, arrays[collection]))
    return variables


# ---------------------------------------------------------------------------------------------- the losses

class SupConLoss(nn.Module):
    def __init__(self, temperature=0.07, contrast_mode='all', base_temperature=0.07):
        super().__init__()
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features, labels=None, mask=None):
        batch_size = features.shape[0]
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float()
        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_feature = contrast_feature
        anchor_count = contrast_count
        anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), self.temperature)
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()
        mask = mask.repeat(anchor_count, contrast_count)
        logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                    torch.arange(batch_size * anchor_count).view(-1, 1), 0)
        mask = mask * logits_mask
        exp_logits = torch.exp(logits) * logits_mask
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
        loss = - (self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.view(anchor_count, batch_size).mean()


def kdloss(y, teacher_scores):
    p = F.log_softmax(y, dim=1)
    q = F.softmax(teacher_scores, dim=1)
    return F.kl_div(p, q, reduction='sum') / y.shape[0]


class DeepInversionFeatureHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data.type(var.type()) - var, 2) + torch.norm(
            module.running_mean.data.type(var.type()) - mean, 2)


# -------------------------------------------------------------------------------------------- the networks

class OutFeature(nn.Module):
    """A zoo network answering `forward(x, out_feature=True)` with (normalised penultimate feature, logits)."""

    def __init__(self, model: nn.Module, classifier: nn.Module):
        super().__init__()
        self.model = model
        self.classifier = classifier

    def forward(self, x, out_feature=False):
        captured = []  # the hook lives for this call only, so the module can be copied between calls
        handle = self.classifier.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
        try:
            out = self.model(x)
        finally:
            handle.remove()
        if out_feature:
            return F.normalize(captured[0], p=2, dim=1), out
        return out


class WRNAdapter(nn.Module):
    """network/adapter.py with head='mlp'."""

    def __init__(self, model=None, feat_in=256, feat_out=256):
        super().__init__()
        self.model = model
        self.head = nn.Sequential(nn.Linear(feat_in, feat_in), nn.ReLU(inplace=True), nn.Linear(feat_in, feat_out))

    def forward(self, x, out_feature=False):
        if out_feature:
            origin_fea, out = self.model(x, out_feature=out_feature)
            return self.head(origin_fea), out
        return self.model(x, out_feature=out_feature)


# ------------------------------------------------------------------------------------------------ the steps

class CpscSteps:
    """`train()`'s two loop bodies with every loss switched on (--loss_IKD --loss_BN --loss_SCL --loss_CE)."""

    def __init__(self, generator, teacher, student, *, dataset="cifar10", lr_G=1e-3, co_alpha=5.0, co_beta=1.0,
                 co_gamma=0.7, co_eta=0.7, temp=0.07):
        self.generator, self.teacher, self.student = generator, teacher, student
        self.dataset, self.lr_G, self.temp = dataset, lr_G, temp
        self.co_alpha, self.co_beta, self.co_gamma, self.co_eta = co_alpha, co_beta, co_gamma, co_eta
        self.hooks = [DeepInversionFeatureHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        teacher.eval()
        student.train()
        generator.train()

    def generator_step(self, z_tensor, labels):
        """One G step; returns (loss_G, its terms, the generator's gradients by parameter name)."""
        generator, teacher, student = self.generator, self.teacher, self.student
        loss_G = 0
        z = nn.Parameter(z_tensor.clone().view(z_tensor.shape[0], -1, 1, 1))
        optimizer_G = torch.optim.Adam([{'params': generator.parameters()}, {'params': [z]}], self.lr_G,
                                       betas=[0.5, 0.999])
        optimizer_G.zero_grad()
        generator.train()
        fake = generator(z, labels)
        t_fea, t_logit = teacher(fake, out_feature=True)
        s_fea, s_logit = student(fake, out_feature=True)
        loss_KD = - kdloss(s_logit, t_logit)
        loss_G += loss_KD
        if self.dataset == 'cifar10':
            loss_l2 = - torch.log(F.mse_loss(s_logit, t_logit.detach()))
        else:
            loss_l2 = - F.mse_loss(s_logit, t_logit.detach())
        loss_G += self.co_alpha * loss_l2
        loss_BN = sum([h.r_feature for h in self.hooks])
        loss_G += self.co_beta * loss_BN
        features = torch.cat([s_fea.unsqueeze(1), t_fea.unsqueeze(1)], dim=1)
        loss_SCL = SupConLoss(temperature=self.temp)(features, labels=labels)
        loss_G += self.co_gamma * loss_SCL
        loss_CE = F.cross_entropy(F.softmax(t_logit, dim=1), labels, reduction='mean')
        loss_G += self.co_eta * loss_CE
        loss_G.backward()
        optimizer_G.step()
        terms = {"kd": -loss_KD.item(), "ikd": loss_l2.item(), "bn": loss_BN.item(), "supcon": loss_SCL.item(),
                 "ce": loss_CE.item()}
        grads = {name: p.grad.detach().numpy().copy() for name, p in generator.named_parameters()}
        return loss_G.item(), terms, grads, fake.detach()

    def student_step(self, z_tensor, labels, optimizer_S):
        """One S step; returns (loss_S, its terms)."""
        generator, teacher, student = self.generator, self.teacher, self.student
        loss_S = 0
        z = nn.Parameter(z_tensor.clone().view(z_tensor.shape[0], -1, 1, 1))
        optimizer_S.zero_grad()
        fake = generator(z, labels).detach()
        with torch.no_grad():
            t_fea, t_logit = teacher(fake, out_feature=True)
        s_fea, s_logit = student(fake, out_feature=True)
        base_KD = kdloss(s_logit, t_logit.detach())
        loss_S += base_KD
        if self.dataset == 'cifar10':
            loss_l2 = torch.log(torch.norm(t_logit.detach() - s_logit, 2))
        else:
            loss_l2 = F.mse_loss(s_logit, t_logit.detach())
        loss_S += self.co_alpha * loss_l2
        loss_CE = F.cross_entropy(F.softmax(s_logit, dim=1), labels, reduction='mean')
        loss_S += self.co_eta * loss_CE
        loss_S.backward()
        optimizer_S.step()
        return loss_S.item(), {"kd": base_KD.item(), "ikd": loss_l2.item(), "ce": loss_CE.item()}

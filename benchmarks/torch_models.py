"""PyTorch reference networks, written as the upstream codebases write them (NCHW, nn.Module, in-place ReLUs).

- akamaster/pytorch_resnet_cifar10: He ResNets with option-A shortcuts (LambdaLayer with F.pad), head `linear`;
- chenyaofo/pytorch-cifar-models: He ResNets with option-B `downsample`, head `fc`, adaptive pooling;
- the CMI / Fast / NAYER zoo: resnet18/34 (`shortcut` Sequential), ZSKT WideResNets, RepDistiller VGG-BN.
They are the independent side of the parity tests: same checkpoints, same inputs, logits compared.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------- akamaster (option A)

class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class AkamasterBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class AkamasterResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(AkamasterBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


# ------------------------------------------------------------------------------------- chenyaofo (option B)

class ChenyaofoBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ChenyaofoResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [ChenyaofoBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ChenyaofoBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


# ------------------------------------------------------------------------------------------ CMI zoo: resnet18/34

class CmiBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CmiResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CmiBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


# ------------------------------------------------------------------------------------------- ZSKT WideResNet

class WrnBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                                                bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class WrnNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WrnBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1) for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes=10):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = WrnNetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = WrnNetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = WrnNetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).view(-1, self.nChannels)
        return self.fc(out)


# --------------------------------------------------------------------------------------- RepDistiller VGG-BN

class VGG(nn.Module):
    def __init__(self, cfg, num_classes=10):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(cfg, in_channels):
        layers = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(x.view(x.size(0), -1))


ZOO = {
    "resnet18": lambda k: CmiResNet([2, 2, 2, 2], k),
    "resnet34": lambda k: CmiResNet([3, 4, 6, 3], k),
    "wrn_16_1": lambda k: WideResNet(16, 1, k),
    "wrn_16_2": lambda k: WideResNet(16, 2, k),
    "wrn_40_1": lambda k: WideResNet(40, 1, k),
    "wrn_40_2": lambda k: WideResNet(40, 2, k),
    "vgg8_bn": lambda k: VGG([[64], [128], [256], [512], [512]], k),
    "vgg11_bn": lambda k: VGG([[64], [128], [256, 256], [512, 512], [512, 512]], k),
}


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (every BN, 1-D and 2-D), so a swapped mean/var or
    scale/bias shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
    return model


# ------------------------------------------------------------------------- CMI / Fast / NAYER generators

def dcgan_trunk(ngf: int, nc: int) -> nn.Sequential:
    """The `conv_blocks` both upstream generators spell out (same modules, same state_dict keys)."""
    return nn.Sequential(
        nn.BatchNorm2d(ngf * 2),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
        nn.Sigmoid(),
    )


class Generator(nn.Module):
    """CMI / Fast / NAYER "DCGAN-small" generator, as upstream writes it."""

    def __init__(self, nz=100, ngf=64, img_size=32, nc=3):
        super().__init__()
        self.params = (nz, ngf, img_size, nc)
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = dcgan_trunk(ngf, nc)

    def forward(self, z):
        out = self.l1(z)
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        img = self.conv_blocks(out)
        return img


class NLGenerator(nn.Module):
    """NAYER's generator: label embedding -> BatchNorm1d -> one noisy Linear per chunk of `nl` samples -> trunk."""

    def __init__(self, ngf=64, img_size=32, nc=3, nl=100, label_emb=None, le_emb_size=256, le_size=512, sbz=200):
        super().__init__()
        self.params = (ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)
        self.le = label_emb
        self.nl = nl
        self.init_size = img_size // 4
        self.le_size = le_size
        self.nle = -(-sbz // nl)  # upstream: int(np.ceil(sbz / nl))
        self.sbz = sbz
        self.n1 = nn.BatchNorm1d(le_size)
        self.le1 = nn.ModuleList([nn.Linear(le_size, le_emb_size) for i in range(self.nle)])
        self.l1 = nn.Sequential(nn.Linear(le_emb_size, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = dcgan_trunk(ngf, nc)

    def re_init_le(self):
        for i in range(self.nle):
            nn.init.normal_(self.le1[i].weight, mean=0, std=1)
            nn.init.constant_(self.le1[i].bias, 0)

    def forward(self, targets=None):
        le = self.le[targets].detach()
        le = self.n1(le)
        v = None
        for i in range(self.nle):
            if (i + 1) * self.nl > le.shape[0]:
                sle = le[i * self.nl:]
            else:
                sle = le[i * self.nl:(i + 1) * self.nl]
            sv = self.le1[i](sle)
            if v is None:
                v = sv
            else:
                v = torch.cat((v, sv))
        out = self.l1(v)
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        img = self.conv_blocks(out)
        return img

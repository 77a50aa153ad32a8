"""Multi-scale patch-based representation learning (Tsai, Wu & Lai, WACV 2022), the successor of
Patch SVDD: encoders for 64, 32 and 16 px patches trained on normal images with four losses.

- ``Encoder16`` maps a 16 x 16 patch to a D-dim code; no padding, so on a whole image its code at
  output (i, j) is exactly the code of the 16 px window at pixel (4 i, 4 j).
- The 32 px encoder combines the 2 x 2 grid of 16 px codes of its sub-patches, the 64 px encoder
  the 2 x 2 grid of 32 px codes (hierarchical encoding as in Patch SVDD sec. 3.3). On a whole
  image the 2 x 2 convolutions are dilated by 16 / 4 = 4 and 32 / 4 = 8 code cells, so one
  fully convolutional pass gives every scale's code at every 4 px position, each equal to the
  per-patch computation.
- Losses, per scale K: SVDD' (a patch and its neighbour jittered by at most K / 8 have close
  codes), the relative-direction SSL (which of 12 directions, 30 degrees apart, a second patch
  at distance K lies in), the cosine loss (a nearby patch is more similar in cosine than a far
  one, by a margin) and the k-means loss (codes close to the nearest of k centroids, k = 50,
  the centroids re-estimated from recent codes). L = sum over scales of L_SSL + kmeans_weight
  L_km + lam (L_SVDD' + L_cos). The authors' training script (github.com/Howeng98/MSPBA) uses
  lam = 1e-3 and k-means at weight 1 (lr 1e-5, on VGG16 features); from scratch here that
  collapses the codes onto the centroids (README), so both weights default to 1.

Training is dense: each step encodes a few random crops in one fully convolutional pass and
reads every sampled patch's code (100 per loss per crop) off the code maps, which is the same
code the per-patch encoder gives (tested) at a small fraction of the cost of encoding 2,000
patches one by one. Offsets are therefore multiples of the 4 px code stride.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.svdd import (
    Combine,
    CropSampler,
    PlateauStop,
    PositionClassifier,
    SvddHistory,
    anchors,
    check_device,
    gather,
)
from pipeline.config import MspConfig

STRIDE = 4  # code stride of every scale on the dense maps
SCALES = (64, 32, 16)
# (patch side, inference stride, ONNX output, index file) per scale: strides a quarter of the
# patch side, as Patch SVDD's 16 px for 64 px patches.
INFERENCE = (
    (64, 16, "codes64", "index.faiss"),
    (32, 8, "codes32", "index32.faiss"),
    (16, 4, "codes16", "index16.faiss"),
)
ANGLES = 12  # relative directions of the SSL task, 30 degrees apart


class Encoder16(nn.Module):
    """(N, C, H, W) -> (N, D, (H - 16) / 4 + 1, (W - 16) / 4 + 1). Receptive field exactly 16 px:
    k3 s1 -> k4 s2 -> k3 s1 -> k4 s2, no padding."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(64, 64, 4, stride=2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(64, 128, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, dim, 4, stride=2),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MspEncoder(nn.Module):
    """The three hierarchical encoders. ``forward``: dense codes of every scale at stride 4,
    a dict {64: (N, D, h64, w64), 32: ..., 16: ...}; ``encode_patches``: per-patch form."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.enc16 = Encoder16(channels, dim)
        self.head32 = Combine(dim)
        self.head64 = Combine(dim)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        c16 = self.enc16(x)
        c32 = self.head32(c16, dilation=16 // STRIDE)
        c64 = self.head64(c32, dilation=32 // STRIDE)
        return {64: c64, 32: c32, 16: c16}

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, K, K) with K in 16, 32, 64 -> (N, D), one patch at a time in effect."""
        k = patches.shape[-1]
        if k == 16:
            return self.enc16(patches)[:, :, 0, 0]
        if k not in (32, 64):
            raise ValueError(f"patch side {k} is not 16, 32 or 64")
        h = k // 2
        n = patches.shape[0]
        subs = torch.cat([patches[:, :, :h, :h], patches[:, :, :h, h:], patches[:, :, h:, :h], patches[:, :, h:, h:]])
        codes = self.encode_patches(subs)  # (4N, D)
        grid = codes.view(4, n, -1).permute(1, 2, 0).reshape(n, -1, 2, 2)
        head = self.head32 if k == 32 else self.head64
        return head(grid, dilation=1)[:, :, 0, 0]


def _offsets_cells(kind: str, k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Offsets in code cells (4 px) of ``n`` partners for scale ``k``; labels for the SSL task."""
    cells = k / STRIDE
    jitter = max(1, round(k / 8 / STRIDE))
    if kind == "near":  # SVDD' partner and the cosine loss's positive: within K / 8 (at least a cell)
        off = rng.integers(-jitter, jitter + 1, (n, 2))
        off[(off == 0).all(axis=1)] = (0, 1)
        return off, None
    if kind == "direction":  # 12 directions at distance K, jittered
        labels = rng.integers(ANGLES, size=n)
        theta = labels * (2 * math.pi / ANGLES)
        off = np.rint(np.stack([np.sin(theta), np.cos(theta)], axis=1) * cells).astype(np.int64)
        return off + rng.integers(-jitter, jitter + 1, (n, 2)), labels
    if kind == "far":  # the cosine loss's negative: between 1 and 1.5 K away, any direction
        theta = rng.uniform(0, 2 * math.pi, n)
        r = rng.uniform(1.0, 1.5, n) * cells
        return np.rint(np.stack([np.sin(theta) * r, np.cos(theta) * r], axis=1)).astype(np.int64), None
    raise ValueError(kind)


def _kmeans(x: torch.Tensor, centroids: torch.Tensor | None, k: int, gen: torch.Generator) -> torch.Tensor:
    """A few Lloyd steps on ``x`` (n, D), from the previous centroids or from random samples."""
    if centroids is None:
        centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(10):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        for c in range(centroids.shape[0]):
            members = x[assign == c]
            if len(members):
                centroids[c] = members.mean(dim=0)
    return centroids


@dataclass
class MspState:
    centroids: dict[int, torch.Tensor | None] = field(default_factory=lambda: dict.fromkeys(SCALES))
    recent: dict[int, list[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in SCALES})


def msp_losses(
    enc: MspEncoder,
    classifiers: nn.ModuleDict,
    crops: torch.Tensor,
    cfg: MspConfig,
    state: MspState,
    rng: np.random.Generator,
) -> tuple[dict[str, torch.Tensor], float]:
    """The four losses summed over scales, averaged over crops, and the SSL accuracy."""
    maps = enc(crops)
    zero = torch.zeros((), device=crops.device)
    total = {"svdd": zero, "ssl": zero, "cos": zero, "km": zero}
    correct, count = 0, 0
    n = cfg.samples
    for k in SCALES:
        for b in range(crops.shape[0]):
            codes = maps[k][b]
            shape = (codes.shape[1], codes.shape[2])
            # SVDD' (Patch SVDD eq. 3): a patch and its jittered neighbour.
            off, _ = _offsets_cells("near", k, n, rng)
            a = anchors(shape, rng, off)
            fa, fb = gather(codes, a), gather(codes, a + off)
            total["svdd"] = total["svdd"] + ((fa - fb) ** 2).sum(dim=1).mean()
            # SSL: one of 12 directions at distance K.
            off, labels = _offsets_cells("direction", k, n, rng)
            assert labels is not None
            a = anchors(shape, rng, off)
            logits = classifiers[str(k)](gather(codes, a), gather(codes, a + off))
            target = torch.from_numpy(labels).to(codes.device)
            total["ssl"] = total["ssl"] + F.cross_entropy(logits, target)
            correct += int((logits.argmax(dim=1) == target).sum())
            count += n
            # Cosine: a near patch more similar than a far one, by a margin.
            near, _ = _offsets_cells("near", k, n, rng)
            far, _ = _offsets_cells("far", k, n, rng)
            a = anchors(shape, rng, near, far)
            fa = gather(codes, a)
            cos_near = F.cosine_similarity(fa, gather(codes, a + near), dim=1)
            cos_far = F.cosine_similarity(fa, gather(codes, a + far), dim=1)
            total["cos"] = total["cos"] + F.relu(cos_far - cos_near + cfg.cos_margin).mean()
            # k-means: codes close to the nearest centroid.
            cells = np.stack([rng.integers(shape[0], size=n), rng.integers(shape[1], size=n)], axis=1)
            f = gather(codes, cells)
            state.recent[k].append(f.detach())
            cent = state.centroids[k]
            if cent is not None:
                total["km"] = total["km"] + torch.cdist(f, cent).min(dim=1).values.pow(2).mean()
    per = 1.0 / crops.shape[0]
    return {name: v * per for name, v in total.items()}, correct / max(count, 1)


def train_msp(images: list[np.ndarray], cfg: MspConfig, *, progress: bool = True) -> tuple[MspEncoder, SvddHistory]:
    """Train the three scales on ``images`` with the config's ``msp:`` section (every key but
    ``bank_rows``, which the bank fit reads); seeded (same data and config give the same encoder)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    channels = images[0].shape[2] if images else 1
    sampler = CropSampler(images, cfg.crop, cfg.seed, check_device(cfg.device))
    enc = MspEncoder(channels, cfg.dim).to(sampler.device)
    classifiers = nn.ModuleDict({str(k): PositionClassifier(cfg.dim, classes=ANGLES) for k in SCALES})
    classifiers = classifiers.to(sampler.device)
    opt = torch.optim.Adam([*enc.parameters(), *classifiers.parameters()], lr=cfg.lr)
    state = MspState()
    hist = SvddHistory()
    t0 = time.perf_counter()
    stop = PlateauStop(patience=cfg.patience, classes=ANGLES, max_minutes=cfg.max_minutes)
    bar = tqdm(range(cfg.iterations), desc="train multi-scale patch encoder", disable=not progress, unit="it")
    for it in bar:
        losses, acc = msp_losses(enc, classifiers, sampler.sample(cfg.crops), cfg, state, rng)
        loss = losses["ssl"] + cfg.kmeans_weight * losses["km"] + cfg.lam * (losses["svdd"] + losses["cos"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % cfg.kmeans_every == 0 or state.centroids[SCALES[0]] is None:
            for k in SCALES:
                recent = torch.cat(state.recent[k])
                if recent.shape[0] >= cfg.clusters:
                    state.centroids[k] = _kmeans(recent, state.centroids[k], cfg.clusters, gen)
                state.recent[k] = state.recent[k][-4:]
        hist.record(
            loss=loss, svdd=losses["svdd"], ssl=losses["ssl"], accuracy=acc, cos=losses["cos"], kmeans=losses["km"]
        )
        if stop.after_step(hist, bar):
            break
    hist.seconds = time.perf_counter() - t0
    return enc.cpu().eval(), hist


class DenseMsp(nn.Module):
    """uint8 pixels (N, H, W, C) -> codes of every 64 px patch at stride 16, every 32 px patch at
    stride 8 and every 16 px patch at stride 4: three NHWC float32 outputs."""

    def __init__(self, enc: MspEncoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        maps = self.enc(x)
        # The dense maps are at stride 4; keep every (stride / 4)-th code of each scale.
        return tuple(
            maps[patch][:, :, :: stride // STRIDE, :: stride // STRIDE].permute(0, 2, 3, 1).contiguous()
            for patch, stride, _, _ in INFERENCE
        )

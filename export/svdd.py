"""Patch SVDD (Yi & Yoon, "Patch SVDD: Patch-level SVDD for Anomaly Detection and
Segmentation", ACCV 2020): a hierarchical patch encoder learned from normal patches only.

- ``Encoder32`` maps a 32 x 32 patch to a D-dim code. It has no padding, so applied to a whole
  image it is fully convolutional: the code at output (i, j) is exactly the code of the 32 x 32
  window at pixel (4 i, 4 j) (stride 4).
- ``Encoder64`` is the hierarchical encoder of sec. 3.3: the 64 x 64 patch is four 32 x 32
  sub-patches encoded by the shared ``Encoder32``, their 2 x 2 grid of codes combined by a
  2 x 2 convolution and a 1 x 1 convolution. On a whole image the 2 x 2 convolution is dilated
  by 32 / 4 = 8 code cells, which makes it exactly the per-patch computation at every position.
- Losses (sec. 3.2): SVDD' pulls the codes of spatially adjacent patches together; the
  self-supervised loss trains a classifier to tell which of the 8 neighbours of a 3 x 3 grid a
  second patch came from (with jitter), which keeps codes from collapsing. L = lambda L_SVDD' +
  L_SSL, for both scales.

Training is dense, like the multi-scale trainer's: each step encodes a few random crops in one
fully convolutional pass and reads every sampled pair's codes (``samples`` per crop per loss per
scale) off the 32 px and 64 px code maps, the same codes the per-patch encoder gives (tested);
positions and jitter are therefore multiples of the 4 px code stride.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.config import SvddConfig
from pipeline.errors import StripinspectError

STRIDE32 = 4  # code stride of Encoder32 applied to an image
# The 8 neighbours of the centre of a 3 x 3 grid, (row, column) in patch sides (Patch SVDD fig. 3).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Jitter of both losses' partner positions, px: K / 8 for the K = 64 patch (Patch SVDD sec. 3.2),
# kept at both scales. Derived from the patch side, not a setting.
JITTER = 64 // 8


class SvddError(StripinspectError):
    """Training or export cannot proceed; one line."""


class Encoder32(nn.Module):
    """(N, C, H, W) float -> (N, D, (H - 32) / 4 + 1, (W - 32) / 4 + 1); a 32 x 32 input gives 1 x 1.

    Receptive field exactly 32 px: k3 s1 -> k4 s2 -> k4 s2 -> k6 s1, no padding.
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(64, 64, 4, stride=2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(64, 128, 4, stride=2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, dim, 6),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Combine(nn.Module):
    """A 2 x 2 grid of sub-patch codes -> one code: a 2 x 2 convolution (dilated on a dense code
    map, so that it reads the codes one sub-patch apart) and a 1 x 1 convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.combine = nn.Conv2d(dim, 128, 2)
        self.out = nn.Conv2d(128, dim, 1)

    def forward(self, grid: torch.Tensor, dilation: int) -> torch.Tensor:
        h = F.conv2d(grid, self.combine.weight, self.combine.bias, dilation=dilation)
        return torch.tanh(self.out(F.leaky_relu(h, 0.1)))


class Encoder64(nn.Module):
    """Hierarchical encoder of 64 x 64 patches on the shared ``Encoder32`` (Patch SVDD sec. 3.3).

    ``forward`` is the dense form: (N, C, H, W) -> (N, D, (H - 64) / 4 + 1, ...), stride 4.
    ``encode_patches`` is the per-patch form on (N, C, 64, 64): four sub-patches, a 2 x 2 grid.
    Both use the same weights and give the same codes.
    """

    def __init__(self, enc32: Encoder32, dim: int) -> None:
        super().__init__()
        self.enc32 = enc32
        self.head = Combine(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sub-patch codes 32 px apart are 32 / 4 = 8 cells apart on the dense code map.
        return self.head(self.enc32(x), dilation=32 // STRIDE32)

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, 64, 64) -> (N, D): crop the four 32 px sub-patches, encode each, combine."""
        n = patches.shape[0]
        subs = torch.cat(
            [
                patches[:, :, 0:32, 0:32],
                patches[:, :, 0:32, 32:64],
                patches[:, :, 32:64, 0:32],
                patches[:, :, 32:64, 32:64],
            ]
        )
        codes = self.enc32(subs)[:, :, 0, 0]  # (4N, D)
        grid = codes.view(4, n, -1).permute(1, 2, 0).reshape(n, -1, 2, 2)
        return self.head(grid, dilation=1)[:, :, 0, 0]


class PositionClassifier(nn.Module):
    """Where the second patch lies relative to the first (one of ``classes`` positions: the 8
    neighbours of Patch SVDD, the 12 directions of the multi-scale method), from the two codes."""

    def __init__(self, dim: int, classes: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1), nn.Linear(128, classes)
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1))


@dataclass
class SvddHistory:
    loss: list[float] = field(default_factory=list)
    svdd: list[float] = field(default_factory=list)
    ssl: list[float] = field(default_factory=list)
    ssl_accuracy: list[float] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)  # multi-scale method only
    kmeans: list[float] = field(default_factory=list)  # multi-scale method only
    seconds: float = 0.0
    stopped_early: bool = False
    stop_reason: str = "iterations"  # "iterations" (all done), "plateau" or "time" (max_minutes)

    def record(
        self,
        *,
        loss: torch.Tensor,
        svdd: torch.Tensor,
        ssl: torch.Tensor,
        accuracy: float,
        cos: torch.Tensor | None = None,
        kmeans: torch.Tensor | None = None,
    ) -> None:
        """One training step's losses (detached here) and SSL accuracy."""
        self.loss.append(float(loss.detach()))
        self.svdd.append(float(svdd.detach()))
        self.ssl.append(float(ssl.detach()))
        self.ssl_accuracy.append(accuracy)
        if cos is not None and kmeans is not None:
            self.cos.append(float(cos.detach()))
            self.kmeans.append(float(kmeans.detach()))


class PlateauStop:
    """Early stop when the mean loss of 100 steps has not improved by 1 % for ``patience``
    evaluations, but never while the position classifier is near chance (at most twice chance):
    a flat loss then means it has not started to learn, not that it has finished. Also stops
    once ``max_minutes`` of wall clock have passed since it was made (None: no budget)."""

    def __init__(self, *, patience: int, classes: int, max_minutes: float | None = None) -> None:
        self.patience = patience
        self.learning_above = 2 / classes
        self.best = math.inf
        self.since_best = 0
        self.deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes

    def after_step(self, hist: SvddHistory, bar: tqdm) -> bool:
        """After every step: the time budget; every 100 recorded steps: show the means on ``bar``
        and evaluate the plateau. True: stop (``hist.stopped_early`` and ``stop_reason`` set)."""
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            hist.stopped_early, hist.stop_reason = True, "time"
            return True
        if not hist.loss or len(hist.loss) % 100:
            return False
        mean, acc = float(np.mean(hist.loss[-100:])), float(np.mean(hist.ssl_accuracy[-100:]))
        bar.set_postfix(loss=f"{mean:.3f}", ssl_acc=f"{acc:.2f}")
        if self.update(mean, acc):
            hist.stopped_early, hist.stop_reason = True, "plateau"
        return hist.stopped_early

    def update(self, mean_loss: float, ssl_accuracy: float) -> bool:
        """One evaluation; True: stop."""
        if mean_loss < self.best * 0.99 or ssl_accuracy <= self.learning_above:
            self.best, self.since_best = min(self.best, mean_loss), 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience


def check_device(device: str) -> str:
    """``device`` if torch can train on it here; else SvddError with the reason."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SvddError(f"training device {device!r}: torch {torch.__version__} sees no CUDA GPU here")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, ValueError) as err:
        raise SvddError(f"training device {device!r}: {str(err).splitlines()[0]}") from None
    return device


class CropSampler:
    """Random square crops of normal images (uint8 (H, W, C)) as float tensors in [-1, 1]."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, device: str = "cpu") -> None:
        if not images:
            raise SvddError("no training images")
        small = [im.shape for im in images if min(im.shape[:2]) < crop]
        if small:
            raise SvddError(f"images must be at least {crop} px on each side (the training crop), got {small[0]}")
        self.images = images
        self.crop = crop
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            im = self.images[int(self.rng.integers(len(self.images)))]
            y = int(self.rng.integers(im.shape[0] - self.crop + 1))
            x = int(self.rng.integers(im.shape[1] - self.crop + 1))
            out.append(np.ascontiguousarray(im[y : y + self.crop, x : x + self.crop]))
        batch = torch.from_numpy(np.stack(out)).to(self.device)
        return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def anchors(shape: tuple[int, int], rng: np.random.Generator, *offsets: np.ndarray) -> np.ndarray:
    """Anchor cells (n, 2) such that anchor + every offset stays on a map of ``shape`` cells."""
    lo = np.maximum(0, -np.minimum.reduce(offsets))
    hi = np.asarray(shape) - np.maximum(0, np.maximum.reduce(offsets))  # exclusive
    if (hi <= lo).any():
        top = max(int(np.abs(o).max()) for o in offsets)
        raise SvddError(f"crop too small for offsets of {top} cells on a {shape} code map")
    return (lo + rng.random(lo.shape) * (hi - lo)).astype(np.int64)


def gather(codes: torch.Tensor, cells: np.ndarray) -> torch.Tensor:
    """codes (D, h, w), cells (n, 2) -> (n, D)."""
    idx = torch.from_numpy(cells[:, 0] * codes.shape[2] + cells[:, 1]).to(codes.device)
    return codes.reshape(codes.shape[0], -1)[:, idx].T


def svdd_losses(
    c64: torch.Tensor,
    c32: torch.Tensor,
    clf64: PositionClassifier,
    clf32: PositionClassifier,
    cfg: SvddConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SVDD' and SSL summed over both scales, averaged over the crops, from the dense code maps
    (N, D, h, w) of every 64 px and every 32 px patch at stride 4; and the SSL accuracy."""
    zero = torch.zeros((), device=c64.device)
    svdd, ssl, correct, count = zero, zero, 0, 0
    n, grid = cfg.samples, np.asarray(NEIGHBOURS)
    j_svdd, j_ssl = max(1, round(JITTER / STRIDE32)), round(JITTER / STRIDE32)
    for k, maps, clf in ((64, c64, clf64), (32, c32, clf32)):
        for b in range(maps.shape[0]):
            codes = maps[b]
            shape = (codes.shape[1], codes.shape[2])
            # SVDD' (eq. 3): a patch and a neighbour within the jitter, close codes.
            off = rng.integers(-j_svdd, j_svdd + 1, (n, 2))
            off[(off == 0).all(axis=1)] = (0, 1)
            a = anchors(shape, rng, off)
            svdd = svdd + ((gather(codes, a) - gather(codes, a + off)) ** 2).sum(dim=1).mean()
            # SSL (eq. 4): which of the 8 neighbours of a 3 x 3 grid of K px cells, jittered.
            labels = rng.integers(len(NEIGHBOURS), size=n)
            off = grid[labels] * (k // STRIDE32) + rng.integers(-j_ssl, j_ssl + 1, (n, 2))
            a = anchors(shape, rng, off)
            logits = clf(gather(codes, a), gather(codes, a + off))
            target = torch.from_numpy(labels).to(codes.device)
            ssl = ssl + F.cross_entropy(logits, target)
            correct += int((logits.argmax(dim=1) == target).sum())
            count += n
    per = 1.0 / c64.shape[0]
    return svdd * per, ssl * per, correct / max(count, 1)


def train_svdd(images: list[np.ndarray], cfg: SvddConfig, *, progress: bool = True) -> tuple[Encoder64, SvddHistory]:
    """Train both scales (64 px hierarchical and its shared 32 px encoder) on ``images`` with the
    config's ``svdd:`` section (every key but ``bank_rows``, which the bank fit reads)."""
    torch.manual_seed(cfg.seed)
    channels = images[0].shape[2] if images else 1
    rng = np.random.default_rng(cfg.seed)
    sampler = CropSampler(images, cfg.crop, cfg.seed, check_device(cfg.device))
    enc32 = Encoder32(channels, cfg.dim)
    enc64 = Encoder64(enc32, cfg.dim).to(sampler.device)
    clf64, clf32 = PositionClassifier(cfg.dim).to(sampler.device), PositionClassifier(cfg.dim).to(sampler.device)
    params = [*enc64.parameters(), *clf64.parameters(), *clf32.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    hist = SvddHistory()
    t0 = time.perf_counter()
    stop = PlateauStop(patience=cfg.patience, classes=len(NEIGHBOURS), max_minutes=cfg.max_minutes)
    bar = tqdm(range(cfg.iterations), desc="train patch svdd", disable=not progress, unit="it")
    for _ in bar:
        c32 = enc32(sampler.sample(cfg.crops))  # every 32 px patch of the crops, stride 4
        c64 = enc64.head(c32, dilation=32 // STRIDE32)  # every 64 px patch (Encoder64's dense form)
        svdd, ssl, acc = svdd_losses(c64, c32, clf64, clf32, cfg, rng)
        loss = cfg.lam * svdd + ssl
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.record(loss=loss, svdd=svdd, ssl=ssl, accuracy=acc)
        if stop.after_step(hist, bar):
            break
    hist.seconds = time.perf_counter() - t0
    return enc64.cpu().eval(), hist


def plot_history(hist: SvddHistory, path: Path) -> None:
    """Loss curves as a PNG (``calibration.plots``, one panel per term since they differ by
    orders of magnitude): total, SVDD', SSL and its accuracy, and cosine and k-means where trained."""
    from calibration.plots import plot_loss_curves  # matplotlib only when curves are drawn

    curves = {"loss": hist.loss, "SVDD'": hist.svdd, "SSL": hist.ssl, "SSL accuracy": hist.ssl_accuracy}
    if hist.cos:
        curves |= {"cosine": hist.cos, "k-means": hist.kmeans}
    plot_loss_curves(path, curves)


class DenseSvdd(nn.Module):
    """uint8 pixels (N, H, W, C) -> codes of every 64 px patch at stride 16 and every 32 px patch
    at stride 4 (Patch SVDD's inference strides): two outputs, NHWC float32."""

    def __init__(self, enc64: Encoder64, channels: int) -> None:
        super().__init__()
        self.enc64 = enc64
        self.channels = channels

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        c32 = self.enc64.enc32(x)
        c64 = self.enc64.head(c32, dilation=32 // STRIDE32)[:, :, ::4, ::4]  # stride 4 -> 16
        return c64.permute(0, 2, 3, 1).contiguous(), c32.permute(0, 2, 3, 1).contiguous()


def export_svdd(
    enc64: Encoder64, channels: int, path: Path, *, check_sizes: tuple[tuple[int, int], ...] = ((96, 128), (160, 112))
) -> float:
    """Write the dense Patch SVDD encoder as ONNX; see ``export_dense_encoder``."""
    net = DenseSvdd(enc64.eval(), channels).eval()
    return export_dense_encoder(net, channels, path, outputs=("codes64", "codes32"), check_sizes=check_sizes)


def export_dense_encoder(
    net: nn.Module,
    channels: int,
    path: Path,
    *,
    outputs: tuple[str, ...],
    check_sizes: tuple[tuple[int, int], ...] = ((96, 128), (160, 112)),
) -> float:
    """Write a dense encoder (uint8 NHWC ``pixels`` in, one NHWC code map per name in ``outputs``)
    as ONNX with dynamic H, W, and return the worst relative error of onnxruntime against torch
    on random inputs of ``check_sizes``; over 1e-4 deletes the file and raises."""
    import onnxruntime as ort

    net = net.eval()
    example = torch.zeros((1, 96, 96, channels), dtype=torch.uint8)
    axes: dict[str, dict[int, str]] = {"pixels": {0: "n", 1: "h", 2: "w"}}
    axes |= {name: {0: "n", 1: f"h_{name}", 2: f"w_{name}"} for name in outputs}
    with torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for h, w in check_sizes:
        px = rng.integers(0, 256, (1, h, w, channels), dtype=np.uint8)
        got = sess.run(None, {"pixels": px})
        with torch.no_grad():
            want = [t.numpy() for t in net(torch.from_numpy(px))]
        for g, t in zip(got, want, strict=True):
            if g.shape != t.shape:
                path.unlink(missing_ok=True)
                raise SvddError(f"onnxruntime shape {g.shape} != torch {t.shape} at {h} x {w}")
            worst = max(worst, float(np.abs(g - t).max() / max(np.abs(t).max(), 1e-12)))
    if worst > 1e-4:
        path.unlink(missing_ok=True)
        raise SvddError(f"exported encoder differs from torch by {worst:.2e} (> 1e-4)")
    return worst

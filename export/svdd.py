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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import StripinspectError

STRIDE32 = 4  # code stride of Encoder32 applied to an image
# The 8 neighbours of the centre of a 3 x 3 grid, (row, column) in patch sides (Patch SVDD fig. 3).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


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


@dataclass(frozen=True)
class SvddTrainConfig:
    """``lam``: weight of the SVDD' loss against the SSL loss (the paper raises it for textures)."""

    dim: int = 64
    lam: float = 1.0
    iterations: int = 3000
    batch: int = 64
    lr: float = 1e-4
    jitter_svdd: int = 8  # px: the SVDD' partner is this close
    jitter_ssl: int = 8  # px: perturbation of the 3 x 3 grid positions (K / 8 for K = 64)
    patience: int = 5  # evaluations (every 100 iterations) without 1 % improvement: stop (once learning)
    seed: int = 0
    device: str = "cpu"  # torch device for training ("cuda" for the GPU preset)
    max_minutes: float | None = None  # wall-clock budget of the training loop; None: none


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


class PatchSampler:
    """Random patch pairs from normal images (uint8 (H, W, C)), seeded."""

    def __init__(self, images: list[np.ndarray], seed: int, device: str = "cpu") -> None:
        if not images:
            raise SvddError("no training images")
        small = [im.shape for im in images if min(im.shape[:2]) < 3 * 64 + 2 * 16]
        if small:
            raise SvddError(f"images must be at least 224 px on each side for 64 px patches, got {small[0]}")
        self.device = torch.device(device)
        # Kept as uint8 (a quarter of float32's memory); only the sampled patches are scaled.
        self.images = [torch.from_numpy(np.ascontiguousarray(im)).to(self.device).permute(2, 0, 1) for im in images]
        self.rng = np.random.default_rng(seed)

    def _crop(self, img: torch.Tensor, y: int, x: int, k: int) -> torch.Tensor:
        return img[:, y : y + k, x : x + k]

    @staticmethod
    def _scaled(patches: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(patches).float().div(127.5).sub(1.0)

    def svdd_pairs(self, n: int, k: int, jitter: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = [], []
        for _ in range(n):
            img = self.images[int(self.rng.integers(len(self.images)))]
            _, h, w = img.shape
            y = int(self.rng.integers(jitter, h - k - jitter + 1))
            x = int(self.rng.integers(jitter, w - k - jitter + 1))
            dy, dx = (int(v) for v in self.rng.integers(-jitter, jitter + 1, 2))
            a.append(self._crop(img, y, x, k))
            b.append(self._crop(img, y + dy, x + dx, k))
        return self._scaled(a), self._scaled(b)

    def ssl_pairs(self, n: int, k: int, jitter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, labels = [], [], []
        for _ in range(n):
            img = self.images[int(self.rng.integers(len(self.images)))]
            _, h, w = img.shape
            reach = k + jitter
            y = int(self.rng.integers(reach, h - k - reach + 1))
            x = int(self.rng.integers(reach, w - k - reach + 1))
            label = int(self.rng.integers(8))
            ry, rx = NEIGHBOURS[label]
            dy, dx = (int(v) for v in self.rng.integers(-jitter, jitter + 1, 2))
            a.append(self._crop(img, y, x, k))
            b.append(self._crop(img, y + ry * k + dy, x + rx * k + dx, k))
            labels.append(label)
        return self._scaled(a), self._scaled(b), torch.tensor(labels, device=self.device)


def _scale_losses(
    encode: object, clf: PositionClassifier, sampler: PatchSampler, k: int, cfg: SvddTrainConfig
) -> tuple[torch.Tensor, torch.Tensor, float]:
    a, b = sampler.svdd_pairs(cfg.batch, k, cfg.jitter_svdd)
    fa, fb = encode(a), encode(b)  # type: ignore[operator]
    svdd = ((fa - fb) ** 2).sum(dim=1).mean()  # SVDD' (eq. 3): adjacent patches, close codes
    p, q, labels = sampler.ssl_pairs(cfg.batch, k, cfg.jitter_ssl)
    logits = clf(encode(p), encode(q))  # type: ignore[operator]
    ssl = F.cross_entropy(logits, labels)  # eq. 4: relative position among 8 neighbours
    acc = float((logits.argmax(dim=1) == labels).float().mean())
    return svdd, ssl, acc


def train_svdd(
    images: list[np.ndarray], cfg: SvddTrainConfig, *, progress: bool = True
) -> tuple[Encoder64, SvddHistory]:
    """Train both scales (64 px hierarchical and its shared 32 px encoder) on ``images``."""
    torch.manual_seed(cfg.seed)
    channels = images[0].shape[2] if images else 1
    sampler = PatchSampler(images, cfg.seed, check_device(cfg.device))
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
        s64, l64, acc64 = _scale_losses(enc64.encode_patches, clf64, sampler, 64, cfg)
        s32, l32, acc32 = _scale_losses(lambda x: enc32(x)[:, :, 0, 0], clf32, sampler, 32, cfg)
        svdd, ssl = s64 + s32, l64 + l32
        loss = cfg.lam * svdd + ssl
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.record(loss=loss, svdd=svdd, ssl=ssl, accuracy=(acc64 + acc32) / 2)
        if stop.after_step(hist, bar):
            break
    hist.seconds = time.perf_counter() - t0
    return enc64.cpu().eval(), hist


def plot_history(hist: SvddHistory, path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Loss curves (total, SVDD', SSL, and cosine and k-means where trained; smoothed over 50
    iterations, each scaled to its own maximum, since the terms differ by orders of magnitude)
    as a PNG, drawn with OpenCV."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    curves = [(hist.loss, (0, 0, 0)), (hist.svdd, (200, 80, 0)), (hist.ssl, (0, 0, 200))]
    label = "loss (black), SVDD' (blue), SSL (red)"
    if hist.cos:
        curves += [(hist.cos, (0, 150, 0)), (hist.kmeans, (160, 0, 160))]
        label += ", cosine (green), k-means (purple)"
    k = 50
    smooth = [np.convolve(c, np.ones(k) / k, mode="valid") if len(c) >= k else np.asarray(c) for c, _ in curves]
    n = max((len(s) for s in smooth), default=1)
    for s, (_, colour) in zip(smooth, curves, strict=True):
        if len(s) < 2:
            continue
        pts = np.array(
            [
                (int(20 + i / max(n - 1, 1) * (w - 40)), int(h - 20 - v / (float(s.max()) or 1.0) * (h - 40)))
                for i, v in enumerate(s)
            ],
            np.int32,
        )
        cv2.polylines(img, [pts], False, colour, 2)
    cv2.putText(img, label, (24, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (60, 60, 60), 1)
    cv2.imwrite(str(path), img)


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

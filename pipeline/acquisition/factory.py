"""The one place that turns the config's source section into a ``Source``."""

from __future__ import annotations

from pipeline.acquisition.sources import FolderSource, Source, SyntheticSource
from pipeline.config import Config, ConfigError


def open_source(cfg: Config) -> Source:
    """The camera (or stand-in) that ``daemon.source.kind`` names; ConfigError of one line when
    its section is incomplete. GenICam and video are imported only when chosen (optional deps)."""
    d = cfg.daemon
    kind = d.source.kind
    if kind == "genicam":
        from pipeline.acquisition.genicam import GenicamSource

        return GenicamSource(cfg=d.source.genicam)
    if kind == "video":
        from pipeline.acquisition.sources import VideoSource

        if d.source.video is None:
            raise ConfigError("daemon.source.video is required for kind: video")
        return VideoSource(path=d.source.video)
    if kind == "folder":
        if d.source.folder is None:
            raise ConfigError("daemon.source.folder is required for kind: folder")
        return FolderSource(folder=d.source.folder, channels=1)
    syn = cfg.synthetic
    try:
        return SyntheticSource(cfg=d.source, width=syn.width, seed=syn.seed, frame_lines=d.frame_lines)
    except ValueError as e:
        # The camera's width is synthetic.width; a slice that does not fit on the strip is a
        # config mistake, reported as one at start.
        raise ConfigError(f"daemon.source: {e}") from None

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config, parse_config
from tests.conftest import REPO


def test_shipped_config_is_valid_and_matches_defaults() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg == Config()


def test_missing_file_is_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"fit": {"coreset": {"ratio": 2.0}}}, "fit.coreset.ratio = 2.0"),
        ({"scoring": {"sigma": -1}}, "scoring.sigma = -1"),
        ({"backbone": {"name": "vgg16"}}, "backbone.name = 'vgg16'"),
        ({"runtime": {"onnx_threads": "many"}}, "runtime.onnx_threads = 'many'"),
        ({"fit": {"scael": 0.5}}, "fit.scael = 0.5: unknown key"),
    ],
)
def test_errors_name_key_path_and_value(doc: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "x.yaml")
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("fit: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(evil)


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(ValueError, match="frozen"):
        cfg.fit.scale = 2.0  # type: ignore[misc]

"""Pointing a config at the data without editing it: ``--set``/``--data-root`` on the command line,
``overrides``/``data_root`` in Python, one validation for both; and arguments refused at the door."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from ocbank import config
from ocbank.cli import build_parser, main
from ocbank.errors import ConfigError

from .conftest import tiny_config
from .test_cli import write_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_python_overrides_and_data_root_change_the_config(tmp_path):
    cfg = config.load("mvtec", data_root=tmp_path, overrides={"bank.radius": 0.5, "data": {"crop": 200}, "device": "cpu"})
    assert cfg.data.root == str(tmp_path) and cfg.bank.radius == 0.5 and cfg.data.crop == 200 and cfg.device == "cpu"
    assert cfg.data.resize == 256 and cfg.bank.radius_images == 50  # the rest is the bundled file's
    assert cfg.replace(bank={"seed": 3}).bank.radius == 0.5  # replace merges the same way


@pytest.mark.parametrize("key", ["bank.radiu", "banks.radius", "data.root.x", "radius"])
def test_an_unknown_key_is_one_line_listing_the_known_keys(tmp_path, key):
    with pytest.raises(ConfigError) as info:
        config.load("mvtec", data_root=tmp_path, overrides={key: 1})
    message = str(info.value)
    assert "\n" not in message and repr(key) in message
    listed = message.split("Known keys: ")[1].rstrip(".").split(", ")
    assert listed == config.known_keys() and {"data.root", "bank.radius", "device"} <= set(listed)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [("bank.radius=0.5", "bank.radius", 0.5), ("data.crop=null", "data.crop", None),
     ("data.classes=[bottle, cable]", "data.classes", ["bottle", "cable"]), ("data.root='7'", "data.root", "7"),
     ("device=cpu", "device", "cpu"), ("data.root=/a=b", "data.root", "/a=b")],
)
def test_set_values_are_typed_as_the_yaml_types_them(text, key, value):
    assert config.parse_assignment(text) == (key, value)


def test_a_bundled_config_without_its_data_points_at_data_root_not_at_the_file():
    with pytest.raises(ConfigError) as info:
        config.load("mvtec")
    message = str(info.value)
    assert "--data-root" in message and "data_root=" in message
    assert "bundled" not in message.split("exist")[1]  # no "fix the path in <bundled mvtec.yaml>"


def test_configuration_page_examples_run_as_written(tmp_path, monkeypatch):
    """The Python blocks of docs/configuration.md, run from a checkout (configs/) with the data folder they name."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for root in set(re.findall(r'data_root="([^"]+)"', text)):
        (tmp_path / root).mkdir()
    for code in blocks:
        exec(compile(code, "docs/configuration.md", "exec"), {})  # noqa: S102


def test_cli_set_and_data_root_change_the_run(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tmp_path / "elsewhere"))  # data.root names no folder
    argv = ["-q", "suggest-radius", "--config", str(cfg), "--classes", "weave", "--json"]
    assert main([*argv, str(tmp_path / "none.json")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "r3.json"), "--data-root", str(tiny_mvtec)]) == 0
    assert main([*argv, str(tmp_path / "r2.json"), "--data-root", str(tiny_mvtec), "--set", "bank.radius_images=2"]) == 0
    three, two = (json.loads((tmp_path / f"r{n}.json").read_text())["weave"] for n in (3, 2))
    assert three["n_images"] == 3 and two["n_images"] == 2  # tiny_config's 3, then the --set 2


@pytest.mark.parametrize(
    ("setting", "words"),
    [("bank.radiu=1", "unknown config key 'bank.radiu'. Known keys: data.format, data.root,"),
     ("bank.radius_images=many", "bank.radius_images must be an integer >= 1, got 'many'"),
     ("bank.radius", "--set takes section.key=value, got 'bank.radius'")],
)
def test_cli_bad_set_is_one_line(tmp_path, tiny_mvtec, capsys, setting, words):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec))
    assert main(["-q", "suggest-radius", "--config", str(cfg), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ocbank: error: ") and words in err


def test_every_config_command_takes_set_and_data_root():
    sub = next(a for a in build_parser()._actions if a.dest == "command")  # noqa: SLF001
    for name, parser in sub.choices.items():
        flags = {f for a in parser._actions for f in a.option_strings}  # noqa: SLF001
        if "--config" in flags:
            assert {"--set", "--data-root"} <= flags, name


@pytest.mark.parametrize(
    "argv",
    [["serve", "--banks", "b"], ["predict", "--bank", "b.h5", "--input", "x", "--out", "o"],
     ["update", "--bank", "b.h5", "--input", "x", "--out", "o"], ["evaluate", "--config", "c", "--banks", "b", "--out", "o"],
     ["build", "--config", "c", "--out", "o"], ["suggest-radius", "--config", "c"]],
)
def test_an_invalid_device_is_refused_at_the_door(argv, capsys):
    began = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main([*argv, "--device", "gpu"])
    assert info.value.code == 2 and time.perf_counter() - began < 5  # no Ray, no backbone started
    assert "--device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'" in capsys.readouterr().err

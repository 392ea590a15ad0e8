"""config.toml loading: strict, precise messages, paths relative to the file, the shipped file valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import ConfigError, LlamaCppBackendConfig, load

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = """
[backends.f]
type = "fake"
[[models]]
name = "m"
deployments = [{ backend = "f" }]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_serves_the_bundled_model():
    settings = load(ROOT / "config.toml")
    backend = settings.backends["gemma-cpu"]
    assert isinstance(backend, LlamaCppBackendConfig) and backend.model == "bundled:gemma3-270m"
    assert settings.models[0].name == "gemma-3-270m"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nbogus = 1\n" + MINIMAL, "unknown field `bogus` (at `server`)"),
        ("[server]\nport = 'x'\n" + MINIMAL, "Expected `int`, got `str` (at `server.port`)"),
        ("[server]\nport = 70000\n" + MINIMAL, "server.port"),
        ("[backends.f]\ntype = 'gpu'\n", "Invalid value 'gpu' (at `backends.f.type`)"),
        ("[backends.f]\ntype = 'fake'\nscrpt = 'x'\n", "unknown field `scrpt` (at `backends.f`)"),
        (MINIMAL.replace('backend = "f"', 'backend = "g"'), "models[0] ('m').deployments[0].backend: unknown backend 'g' (known: f)"),
        (MINIMAL + '[[models]]\nname = "m"\ndeployments = [{ backend = "f" }]\n', "alias 'm' already used"),
        (MINIMAL.replace('name = "m"', 'name = "m"\nfallbacks = ["zz"]'), "fallbacks: unknown model 'zz'"),
        ("[auth]\nalgorithms = ['none']\n" + MINIMAL, "auth.algorithms: unsupported ['none']"),
        ("not toml = = 1", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert fragment in str(exc.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "models").mkdir()
    settings = load(write(tmp_path, '[audit]\npath = "data/usage.db"\n[backends.l]\ntype = "llamacpp"\nmodel = "models/x.gguf"\n'))
    assert settings.audit.path == str(tmp_path / "data" / "usage.db")
    assert settings.backends["l"].model == str(tmp_path / "models" / "x.gguf")
    assert load(write(tmp_path, '[backends.l]\ntype = "llamacpp"\n')).backends["l"].model == "bundled:gemma3-270m"


def test_config_check_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", str(ROOT / "config.toml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", str(write(tmp_path, "[server]\nprt = 1\n"))], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "unknown field `prt` (at `server`)" in bad.stderr

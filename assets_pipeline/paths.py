"""The two roots (data and artifacts): a setting, else an environment variable, else a git-ignored folder."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ASSETS_PIPELINE_DATA"
ARTIFACTS_ENV = "ASSETS_PIPELINE_ARTIFACTS"


def project_root() -> Path:
    """The repository root for an editable install (the usual case), else the current directory."""
    repo = Path(__file__).resolve().parents[1]
    return repo if (repo / "pyproject.toml").is_file() else Path.cwd()


def resolve_root(setting: str | None, env_var: str, default_name: str) -> Path:
    return Path(setting or os.environ.get(env_var) or project_root() / default_name).expanduser().resolve()

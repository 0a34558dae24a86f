"""Files that ship with the package: the example configs and the JSON Schemas.

In a checkout they are the repository's ``examples/`` and ``schemas/``; in an installed wheel they
are the same files under ``services/bundled/`` (setup.py maps them there).  Without this an
installed ``autointerv run`` found no demo config and silently ran the 20,000-text defaults.
"""

from __future__ import annotations

from pathlib import Path

import services

PACKAGE_ROOT = Path(services.__file__).resolve().parent


def bundled_dir(name: str) -> Path | None:
    """``examples`` or ``schemas``: the installed copy, else the checkout's directory."""
    for candidate in (PACKAGE_ROOT / "bundled" / name, PACKAGE_ROOT.parent / name):
        if candidate.is_dir():
            return candidate
    return None


def default_config_path(cwd: Path | None = None) -> Path | None:
    """``examples/demo.yaml`` of the working directory if there is one (a checkout), else the
    packaged demo config."""
    local = (cwd or Path.cwd()) / "examples" / "demo.yaml"
    if local.is_file():
        return local
    examples = bundled_dir("examples")
    demo = examples / "demo.yaml" if examples else None
    return demo if demo is not None and demo.is_file() else None


def schemas_dir(cwd: Path | None = None) -> Path:
    """``schemas/`` of the working directory if there is one, else the packaged schemas."""
    local = (cwd or Path.cwd()) / "schemas"
    if local.is_dir():
        return local
    return bundled_dir("schemas") or local

"""Packages: ``services`` and its subpackages, plus the repository's ``examples/`` and ``schemas/``
shipped inside it as ``services.bundled.examples`` / ``services.bundled.schemas`` (mapped, not
copied), so an installed ``autointerv`` finds the demo config and the schemas without a checkout
(services/core/bundled.py).  Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

BUNDLED = {"services.bundled.examples": "examples", "services.bundled.schemas": "schemas"}

setup(packages=[*find_packages(include=["services", "services.*"]), *BUNDLED], package_dir=BUNDLED)

"""Fixtures for the field-fault tests: the same ones as test/e2e/conftest.py.

test/e2e/conftest.py is loaded under the module name `e2e_conftest`, because pytest itself
imports this file as `conftest`. Its helpers (taser_harness, http_clients) become importable
from here too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"
FIELD_DIR = Path(__file__).resolve().parent
for folder in (FIELD_DIR, E2E_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

if "e2e_conftest" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("e2e_conftest", E2E_DIR / "conftest.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["e2e_conftest"] = _module
    _spec.loader.exec_module(_module)

# Fixtures and hooks: taser_bin, certs, harness, standin, broker, tunnel, and the report hook
# that lets the harness fixture print process logs when a test fails.
from e2e_conftest import (  # noqa: E402,F401
    broker,
    certs,
    harness,
    pytest_configure,
    pytest_runtest_makereport,
    standin,
    taser_bin,
    tunnel,
)

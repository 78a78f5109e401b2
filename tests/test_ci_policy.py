"""CI refuses to skip: a test whose resource (Chromium, Java, PostgreSQL, the default model,
../shared) is missing skips on a developer machine and fails under CI=true. Every skip in the
test suite goes through tests/conftest.py: require()."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import require

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci", ["true", "TRUE", " true "])
def test_require_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="Chromium is missing"):
        require(False, "Chromium is missing")
    require(True, "never shown")  # present: nothing happens


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_require_skips_elsewhere(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no Java"):
        require(None, "no Java")
    require("/usr/bin/java", "never shown")  # a truthy value counts as present


def test_no_skip_bypasses_require():
    """No pytest.skip / skipif / importorskip outside conftest.require (a new resource check
    written as a plain skip would pass CI silently)."""
    pattern = re.compile(r"pytest\.(skip\s*\(|importorskip|mark\.skip)|\.skipif\(")
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == TESTS / "conftest.py" or "artifacts" in path.parts or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(TESTS)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

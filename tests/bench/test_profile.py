"""`bench profile`: wall time split into operators and Python."""

import json
import math

import pytest

from unimodal.bench import profile as bench_profile


def test_profile_splits_wall_time_into_operators_and_python(tmp_path):
    out = tmp_path / "profile.json"
    assert bench_profile.main(["sample", "--batch", "2", "--grid", "2", "--top", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert 0 < summary["aten share of wall"] <= 1.5  # profiler and wall clock disagree a little, not by 50%
    assert result["operators"] and all(math.isfinite(r["self ms"]) for r in result["operators"])
    assert len(result["rows"]) == 5


def test_profile_refuses_compile_without_the_static_cache(capsys):
    with pytest.raises(SystemExit):
        bench_profile.main(["sample", "--batch", "1", "--grid", "2", "--compile"])
    assert "compile needs cache='static'" in capsys.readouterr().err

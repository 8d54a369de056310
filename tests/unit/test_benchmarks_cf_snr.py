"""benchmarks/cf_snr.py: fault coordinates parsed right, and the measurement runs on a real
planted model (recorded by the real Recorder) with the numbers it reports consistent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.unit._bench import load_benchmark


@pytest.fixture(scope="module")
def cf_snr() -> Any:
    return load_benchmark("cf_snr")


def test_fault_columns(cf_snr: Any) -> None:
    site, cols = cf_snr.fault_columns("blocks.2.mlp.post[neuron=17]", 256, 4)
    assert site == "blocks.2.mlp.post" and cols.tolist() == [17]
    site, cols = cf_snr.fault_columns("blocks.1.attn.z[head=3]", 64, 4)
    assert site == "blocks.1.attn.z" and cols.tolist() == list(range(48, 64))
    with pytest.raises(ValueError, match="unrecognised"):
        cf_snr.fault_columns("blocks.1.mlp", 64, 4)


def test_measure_one_planted_model(cf_snr: Any) -> None:
    from analysis.scenarios.planted import planted_suite

    spec = planted_suite(1)[0]  # GPT-2, one planted neuron
    out = cf_snr.measure_model(spec, n_base=12, n_fail=3, detectors=["cf_raw", "mahalanobis"])
    assert out["kind"] == "gpt2" and len(out["fault_sites"]) == 1
    for name in ("cf_raw", "mahalanobis"):
        rows = out["detectors"][name]
        assert len(rows) == 3
        for r in rows:
            assert np.isfinite(r["z"]) and np.isfinite(r["z_cf"]) and r["hi"] > 0
            assert r["stat"] != r["stat_cf"] or name == "cf_raw"  # the fault moves Mahalanobis
    # the planted neuron explains nearly all of Mahalanobis' unit z (quadratic per feature)
    maha = out["detectors"]["mahalanobis"]
    assert all(r["z"] - r["z_cf"] > 0.9 * r["z"] > 10 for r in maha)
    table = cf_snr.summarise([out])
    assert table.count("\n") == 3 and "| cf_raw |" in table and "| mahalanobis |" in table

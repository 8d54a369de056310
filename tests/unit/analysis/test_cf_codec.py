"""The CF codec (share vs frame modes), the detector factory and baselines from a folder of
incident files written by the real FileExporter from a real tiny GPT-2."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from analysis.cf import (
    DEFAULT_DETECTOR,
    DETECTOR_NAMES,
    CFBaseline,
    CompressionForensics,
    MahalanobisDetector,
    build_baseline_from_dir,
    default_detector,
    make_detector,
)
from analysis.cf._codec import Codec, byte_planes, quantize, zigzag
from integrations.errors import AnalysisError
from integrations.incident import Incident


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.exp(0.5 * rng.standard_normal(d))).astype(np.float32)


def test_quantize_counts_clipping_and_non_finite() -> None:
    x = np.array([[0.5, -1.0, 1e9, np.nan, -np.inf, 0.0]], dtype=np.float32)
    q, clipped = quantize(x, 1.0)
    assert q.dtype == np.int16
    assert q[0].tolist() == [64, -127, 32767, 0, -32767, 0]
    assert clipped == 3  # 1e9, nan, -inf


def test_zigzag_and_planes_are_lossless() -> None:
    q = np.array([[0, -1, 1, -2, 300, -32767]], dtype=np.int16)
    z = zigzag(q)
    assert z[0].tolist() == [0, 1, 2, 3, 600, 65533]
    planes = byte_planes(q)  # [n, 2d]: low plane then high plane
    assert (planes[:, :6].astype(np.uint16) | (planes[:, 6:].astype(np.uint16) << 8)
            ).tolist() == z.tolist()


@pytest.mark.parametrize("mode", ["share", "frame"])
def test_codec_spike_costs_more_bits(mode: str) -> None:
    x = _x(32, 64)
    scale = float(np.quantile(np.abs(x), 0.999))
    codec = Codec(level=1, mode=mode)  # type: ignore[arg-type]
    bits, clipped = codec.bits_per_value(x, scale=scale)
    assert bits.shape == (32,) and clipped == 0 and np.all(bits > 0)
    y = x.copy()
    y[7] *= 6.0  # one position 6x larger: more significant bits per value
    bits2, _ = codec.bits_per_value(y, scale=scale)
    assert bits2[7] > bits[7] + 1.0
    assert int(np.argmax(bits2 - bits)) == 7


@pytest.mark.parametrize("mode", ["share", "frame"])
def test_grouped_units_are_one_frame_each(mode: str) -> None:
    """With ``offsets`` a unit is a group of rows: frame mode compresses exactly that group's
    planes in one frame; share mode sums its rows' shares; a group made 6x larger costs more."""
    import zstandard

    x = _x(12, 64, seed=1)
    offsets = np.array([0, 1, 2, 4, 8, 12])
    codec = Codec(level=1, mode=mode)  # type: ignore[arg-type]
    bits, _ = codec.bits_per_value(x, scale=2.0, offsets=offsets)
    assert bits.shape == (5,)
    if mode == "frame":
        planes = byte_planes(quantize(x, 2.0)[0])
        c = zstandard.ZstdCompressor(level=1, write_checksum=False, write_content_size=False,
                                     write_dict_id=False)
        want = [len(c.compress(planes[a:b].tobytes())) * 8.0 / ((b - a) * 64)
                for a, b in itertools.pairwise(offsets)]
        np.testing.assert_allclose(bits, want)
    else:
        per_row, _ = codec.bits_per_value(x, scale=2.0)
        np.testing.assert_allclose(bits * np.diff(offsets), np.add.reduceat(per_row, offsets[:-1]))
    y = x.copy()
    y[4:8] *= 6.0
    bits2, _ = codec.bits_per_value(y, scale=2.0, offsets=offsets)
    assert int(np.argmax(bits2 - bits)) == 3 and bits2[3] > bits[3] + 1.0


def test_share_mode_matches_the_measured_frame_size() -> None:
    import zstandard

    x = _x(20, 96, seed=3)
    codec = Codec(level=1, mode="share")
    bits, _ = codec.bits_per_value(x, scale=2.0)
    z = zigzag(quantize(x, 2.0)[0])
    frame = zstandard.ZstdCompressor(level=1, write_checksum=False, write_content_size=False,
                                     write_dict_id=False).compress(
        (z & 0xFF).astype(np.uint8).tobytes() + (z >> 8).astype(np.uint8).tobytes())
    assert bits.sum() * 96 / 8 == pytest.approx(len(frame))  # shares add up to the frame
    assert codec.bits_per_value(np.zeros((0, 4), np.float32), scale=1.0)[0].shape == (0,)
    with pytest.raises(ValueError, match="mode"):
        Codec(mode="bogus")  # type: ignore[arg-type]


def _record_to_dir(model: Any, n: int, directory: Path, *, seed: int) -> list[Path]:
    import integrations

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ids = torch.randint(3, int(model.config.vocab_size), (1, 8), generator=g)  # [1, pos]
        with integrations.trace(model, ["blocks.*.resid_post", "blocks.*.mlp"],
                                request_id=f"d{seed}-{i}") as t, torch.no_grad():
            model(input_ids=ids)
        t.incident.write(directory / f"{t.incident.id}.arrow")
    return sorted(directory.glob("*.arrow"))


def test_factory_and_baseline_from_dir(tiny_gpt2: Any, tmp_path: Path) -> None:
    paths = _record_to_dir(tiny_gpt2, 8, tmp_path, seed=5)
    assert len(paths) == 8
    assert DEFAULT_DETECTOR in DETECTOR_NAMES == ("cf", "mahalanobis", "norm")
    base = build_baseline_from_dir(tmp_path, detector="cf", folds=4)
    assert base.detector == "cf" and base.sample_count == 8
    assert base.options["codec"] == "frame"
    rep = make_detector("cf", baseline=base).analyze(Incident.open(paths[0]))
    assert set(rep.sites) == set(base.sites) and rep.detector == "cf"
    # default_detector follows a given baseline's detector; without one it is the default
    assert isinstance(default_detector(baseline=base), CompressionForensics)
    assert default_detector(anomaly_threshold=3.0).name == DEFAULT_DETECTOR
    mb = build_baseline_from_dir(tmp_path, detector="mahalanobis", folds=4)
    assert isinstance(default_detector(baseline=mb), MahalanobisDetector)
    with pytest.raises(AnalysisError, match="unknown detector"):
        make_detector("zip")
    with pytest.raises(AnalysisError, match="not a directory"):
        build_baseline_from_dir(tmp_path / "nope")
    with pytest.raises(AnalysisError, match="at least 2"):
        build_baseline_from_dir(tmp_path, pattern="*.none")
    with pytest.raises(AnalysisError, match="codec"):
        CompressionForensics.build_baseline(paths, codec="lz4")


def _same_report_without_option(base: CFBaseline, option: str, inc: Any) -> Any:
    """Score ``inc`` with ``base`` and with a copy saved before ``option`` existed (the option
    removed); assert both reports agree and return the first."""
    old = CFBaseline.from_bytes(base.to_bytes())
    del old.options[option]
    a = CompressionForensics(baseline=base).analyze(inc)
    b = CompressionForensics(baseline=old).analyze(inc)
    assert a.score == b.score and a.ranked_sites == b.ranked_sites
    return a


def test_baseline_without_unit_option_scores_positions(tiny_gpt2: Any, tmp_path: Path) -> None:
    """Baselines saved before the ``unit`` option existed scored one unit per position and keep
    doing so; ``unit="bucket"`` scores (step, position bucket) groups."""
    paths = _record_to_dir(tiny_gpt2, 6, tmp_path, seed=7)
    per_pos = CompressionForensics.build_baseline(paths, folds=3, unit="position")
    inc = Incident.open(paths[0])
    a = _same_report_without_option(per_pos, "unit", inc)
    assert a.sites["blocks.0.mlp"].n_units == 8  # 8 prompt positions
    grouped = CompressionForensics(baseline=CompressionForensics.build_baseline(
        paths, folds=3, unit="bucket"))
    assert grouped.analyze(inc).sites["blocks.0.mlp"].n_units == 5  # [0] [1] [2,4) [4,7) [7]
    with pytest.raises(AnalysisError, match="unit"):
        CompressionForensics.build_baseline(paths, unit="token")


def test_standardized_preprocessing(tiny_gpt2: Any, tmp_path: Path) -> None:
    """``preprocess="standardize"``: per-feature benign centre and step are learned, persisted
    and applied (a feature pushed far from its benign centre costs more bits than a benign
    incident's), and the baseline round-trips through its file format."""
    paths = _record_to_dir(tiny_gpt2, 8, tmp_path, seed=8)
    base = CompressionForensics.build_baseline(paths, folds=4, preprocess="standardize")
    assert base.options["preprocess"] == "standardize" and base.options["qmax"] == 16
    d = Incident.open(paths[0]).tensor("blocks.0.mlp").shape[-1]
    params = base.params["blocks.0.mlp"]
    assert params["center"].shape == (d,) and params["scale"].shape == (d,)
    assert np.all(params["scale"] > 0)
    again = CFBaseline.from_bytes(base.to_bytes())
    np.testing.assert_array_equal(again.params["blocks.0.mlp"]["center"], params["center"])
    inc = Incident.open(paths[0])
    a, b = (CompressionForensics(baseline=x).analyze(inc) for x in (base, again))
    assert a.score == b.score and a.ranked_sites == b.ranked_sites
    codec = Codec(level=1)
    x = inc.tensor("blocks.0.mlp").reshape(-1, d).numpy()  # [pos, d]
    bits, _ = codec.bits_per_value(x, scale=params["scale"], center=params["center"])
    y = x.copy()
    y[3, 5] = params["center"][5] + 50 * float(params["scale"][5])  # one feature far out
    bits2, _ = codec.bits_per_value(y, scale=params["scale"], center=params["center"])
    assert bits2[3] > bits[3] and np.array_equal(np.delete(bits2, 3), np.delete(bits, 3))
    with pytest.raises(AnalysisError, match="preprocess"):
        CompressionForensics.build_baseline(paths, preprocess="whiten")
    with pytest.raises(AnalysisError, match="qmax"):
        CompressionForensics.build_baseline(paths, qmax=0)


def test_baseline_without_codec_option_uses_frame_codec(tiny_gpt2: Any, tmp_path: Path) -> None:
    """Baselines saved before the ``codec`` option existed keep scoring with one frame per
    position, the codec their reference values were computed with."""
    paths = _record_to_dir(tiny_gpt2, 6, tmp_path, seed=6)
    new = CompressionForensics.build_baseline(paths, folds=3)
    assert new.options["codec"] == "frame"
    inc = Incident.open(paths[0])
    _same_report_without_option(new, "codec", inc)

"""The benchmark suite's CPU smoke mode (what CI runs so that the harness cannot rot) and its bookkeeping."""

import datetime
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import attn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import _suite_impls as impls  # noqa: E402
from benchmarks import _suite_measure as measure  # noqa: E402
from benchmarks import suite  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "suite.json") as fh:
        report = json.load(fh)
    return out, report


def test_smoke_metadata(smoke):
    _, report = smoke
    (meta,) = report["runs"]
    assert meta["smoke"] is True and meta["platform"] == "cpu" and meta["device"]
    assert meta["driver"]
    assert meta["libraries"]["jax"] and meta["libraries"]["numpy"]
    datetime.datetime.fromisoformat(meta["date"])
    assert meta["commit"] == "unknown" or (len(meta["commit"]) == 40 and int(meta["commit"], 16) >= 0)
    assert "all peers" in report["peers_unavailable"]


def test_smoke_rows_are_checked_timed_and_consistent(smoke):
    _, report = smoke
    rows = report["rows"]
    assert {r["family"] for r in rows} == set(impls.FAMILIES)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["kind"] == "ours"
        assert 0 <= r["max_rel_err"] <= r["tol"]
        assert r["ms"] > 0 and r["calls"] >= 3 and r["peak_bytes"] > 0
        seconds = r["ms"] / 1e3
        assert math.isclose(r["tokens_per_s"], r["batch"] * r["seq"] / seconds, rel_tol=1e-9)
        case = impls.Case(r["family"], r["mechanism"], r["batch"], r["seq"], r["heads"], r["head_dim"], r["causal"],
                          r["dtype"], tuple(r["window"]) if r["window"] else None, r["density"], r["block"])
        flops = impls.forward_flops(case) * (1 if r["mode"] == "fwd" else impls.FWD_BWD_FLOP_FACTOR)
        assert math.isclose(r["tflops"], flops / seconds / 1e12, rel_tol=1e-9)
    # Every case times each of its mechanism's implementations (kernels included), forward and fwd+bwd.
    for case in {r["case"] for r in rows}:
        sel = [r for r in rows if r["case"] == case]
        expected = {f"ours {sel[0]['mechanism']}/{i}" for i in attn.spec(sel[0]["mechanism"]).implementations}
        assert {(r["impl"], r["mode"]) for r in sel} == {(i, m) for i in expected for m in ("fwd", "fwd_bwd")}
    assert any(r["impl"] == "ours sliding_window/pallas" for r in rows)
    assert {r["seq"] for r in rows if r["family"] == "dense"} == {64, 128}


def test_smoke_markdown_plots_and_headline(smoke):
    out, report = smoke
    md = (out / "suite.md").read_text()
    for family in impls.FAMILIES:
        assert f"## {family}" in md
    for r in report["rows"]:
        assert f"| {r['case']} | {r['impl']} |" in md
    for name in attn.names():
        assert f"| {name} |" in md
    assert sorted(report["plots"]) == sorted(f"suite_{f}.png" for f in impls.FAMILIES)
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # No peer runs in smoke mode, so no family has a headline entry (rather than a made-up one).
    assert json.loads((out / "headline.json").read_text()) == [] == report["headline"]


def test_smoke_complexity_scan(smoke):
    _, report = smoke
    scan = {s["mechanism"]: s for s in report["complexity_scan"]}
    assert set(scan) == set(attn.names())
    for s in scan.values():
        assert len(s["seqs"]) >= 2, s
        assert all(t > 0 for t in s["seconds"]) and all(b > 0 for b in s["peak_bytes"])
        assert s["label"] in ("linear", "between", "quadratic"), s
        assert math.isfinite(s["time_slope"]) and math.isfinite(s["memory_slope"])
    # Memory slopes come from XLA's buffer assignment: deterministic, so these labels are robust.
    assert scan["softmax"]["label"] == "quadratic" and scan["softmax"]["memory_slope"] > 1.65
    assert scan["linear"]["label"] == "linear" and scan["linear"]["memory_slope"] < 1.35


def test_log_log_slope_and_labels():
    n = np.array([128, 256, 512, 1024])
    assert measure.log_log_slope(n, 3.0 * n ** 2) == pytest.approx(2.0)
    assert measure.log_log_slope(n, 5.0 * n) == pytest.approx(1.0)
    assert measure.log_log_slope([128], [1.0]) is None
    assert [measure.growth_label(x) for x in (0.4, 1.1, 1.5, 1.9, None)] == \
        ["linear", "linear", "between", "quadratic", "unknown"]


@pytest.mark.parametrize("family,causal,extra", [
    ("dense", True, {}), ("dense", False, {}),
    ("sliding_window", True, dict(window=(5, 0))), ("sliding_window", False, dict(window=(3, 4))),
    ("block_sparse", True, dict(density=0.4, block=4)), ("block_sparse", False, dict(density=0.4, block=4)),
])
def test_attended_pairs_count_the_visible_pairs(family, causal, extra):
    mech = {"dense": "softmax"}.get(family, family)
    case = impls.Case(family, mech, 1, 24, 3, 8, causal, "float32", **extra)
    visible = np.ones((3, 24, 24), bool)
    if family == "sliding_window":
        left, right = case.window
        d = np.arange(24)[None, :] - np.arange(24)[:, None]
        visible &= (d >= -left) & (d <= right)
    if family == "block_sparse":
        visible &= np.repeat(np.repeat(impls.block_layout(case), 4, axis=1), 4, axis=2)
    if causal:
        visible &= np.tril(np.ones((24, 24), bool))
    assert impls.attended_pairs(case) == visible.sum()


def _row(family, case, impl, kind, mode, tokens_per_s, status="ok", seq=1024):
    return dict(family=family, case=case, mechanism="m", impl=impl, kind=kind, mode=mode, batch=1, seq=seq,
                heads=2, head_dim=128, causal=True, dtype="bfloat16", window=None, density=None, block=None,
                status=status, tokens_per_s=tokens_per_s, tflops=tokens_per_s / 1e6, run=0)


def test_headline_one_entry_per_family_with_a_measured_peer():
    meta = dict(device="dev", date="2026-01-01T00:00:00+00:00", commit="abc")
    rows = [
        # dense: two shapes; the longer one is picked; a faster but wrong peer is not the best peer.
        _row("dense", "short", "ours a", "ours", "fwd", 10.0, seq=512),
        _row("dense", "short", "peer x", "peer", "fwd", 20.0, seq=512),
        _row("dense", "long", "ours a", "ours", "fwd", 30.0, seq=2048),
        _row("dense", "long", "ours b", "ours", "fwd", 45.0, seq=2048),
        _row("dense", "long", "peer x", "peer", "fwd", 15.0, seq=2048),
        _row("dense", "long", "peer y", "peer", "fwd", 90.0, status="wrong", seq=2048),
        _row("dense", "long", "ours a", "ours", "fwd_bwd", 12.0, seq=2048),
        _row("dense", "long", "peer x", "peer", "fwd_bwd", 24.0, seq=2048),
        # sliding_window: ours only -> no entry.
        _row("sliding_window", "w", "ours a", "ours", "fwd", 5.0),
        # linear_recurrent: the peer has no backward -> fwd_bwd_ratio None.
        _row("linear_recurrent", "l", "ours c", "ours", "fwd", 8.0),
        _row("linear_recurrent", "l", "ours c", "ours", "fwd_bwd", 4.0),
        _row("linear_recurrent", "l", "fla", "peer", "fwd", 16.0),
        _row("linear_recurrent", "l", "fla", "peer", "fwd_bwd", 1.0, status="error"),
    ]
    entries = {e["family"]: e for e in suite.headline(rows, [meta])}
    assert set(entries) == {"dense", "linear_recurrent"}
    dense = entries["dense"]
    assert dense["shape"]["case"] == "long" and dense["ours"] == "ours b" and dense["best_peer"] == "peer x"
    assert dense["fwd_ratio"] == pytest.approx(3.0) and dense["fwd_bwd_ratio"] == pytest.approx(0.5)
    assert (dense["device"], dense["date"], dense["commit"]) == ("dev", meta["date"], "abc")
    lin = entries["linear_recurrent"]
    assert lin["fwd_ratio"] == pytest.approx(0.5) and lin["fwd_bwd_ratio"] is None


def test_headline_prefers_a_case_compared_in_both_modes():
    meta = dict(device="dev", date="2026-01-01T00:00:00+00:00", commit="abc")
    rows = [
        _row("linear_recurrent", "long fwd only", "ours c", "ours", "fwd", 8.0, seq=8192),
        _row("linear_recurrent", "long fwd only", "ours c", "ours", "fwd_bwd", 4.0, seq=8192),
        _row("linear_recurrent", "long fwd only", "fla", "peer", "fwd", 16.0, seq=8192),
        _row("linear_recurrent", "short both", "ours c", "ours", "fwd", 8.0, seq=1024),
        _row("linear_recurrent", "short both", "ours c", "ours", "fwd_bwd", 6.0, seq=1024),
        _row("linear_recurrent", "short both", "fla", "peer", "fwd", 4.0, seq=1024),
        _row("linear_recurrent", "short both", "fla", "peer", "fwd_bwd", 2.0, seq=1024),
    ]
    (entry,) = suite.headline(rows, [meta])
    assert entry["shape"]["case"] == "short both"
    assert entry["fwd_ratio"] == pytest.approx(2.0) and entry["fwd_bwd_ratio"] == pytest.approx(3.0)


def test_merge_keeps_each_rows_run_and_the_peers_measured_anywhere(tmp_path):
    runs = [dict(device="A", date="2026-01-01T00:00:00+00:00", commit="a"),
            dict(device="B", date="2026-01-02T00:00:00+00:00", commit="b")]
    first = dict(runs=[runs[0]], peers_unavailable={"fla": "missing"}, rows=[
        _row("dense", "c1", "ours a", "ours", "fwd", 10.0), _row("dense", "c1", "peer x", "peer", "fwd", 5.0)])
    second = dict(runs=[runs[1]], peers_unavailable={"peer z": "no GPU"},
                  complexity_scan=[dict(mechanism="m")], rows=[
                      _row("dense", "c1", "peer x", "peer", "fwd", 6.0),
                      _row("linear_recurrent", "l", "ours c", "ours", "fwd", 8.0),
                      _row("linear_recurrent", "l", "fla", "peer", "fwd", 16.0)])
    paths = []
    for i, part in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(part))
    merged = suite.merge([str(p) for p in paths])
    assert merged["runs"] == runs and len(merged["rows"]) == 4  # the second run's peer x replaced the first's
    assert [(r["impl"], r["run"]) for r in merged["rows"]] == [("ours a", 0), ("peer x", 1), ("ours c", 1),
                                                               ("fla", 1)]
    assert merged["peers_unavailable"] == {"peer z": "no GPU"}  # fla was measured by the second run
    assert merged["complexity_scan"] == [dict(mechanism="m")] and merged["complexity_scan_run"] == 1
    entries = {e["family"]: e for e in suite.headline(merged["rows"], merged["runs"])}
    assert (entries["dense"]["device"], entries["linear_recurrent"]["device"]) == ("A", "B")


def test_forms_limits_the_timed_implementations(tmp_path):
    forms = attn.spec("sliding_window").implementations
    assert len(forms) > 1  # else the filter below would prove nothing
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(tmp_path), "--families",
                           "sliding_window", "--seqs", "64", "--forms", forms[0], "--no-scan"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "suite.json") as fh:
        rows = json.load(fh)["rows"]
    assert {(r["impl"], r["mode"], r["status"]) for r in rows} == {
        (f"ours sliding_window/{forms[0]}", m, "ok") for m in ("fwd", "fwd_bwd")}

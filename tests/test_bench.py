"""profiling/bench.py as a user runs it: --list, an unknown name, and moe_layer --quick on real
gloo ranks writing the JSON schema that runs are compared by."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.conftest import ROOT, python_bin

BENCH = str(ROOT / "profiling" / "bench.py")


def bench(*args: str, env: dict, timeout: float = 85) -> subprocess.CompletedProcess:
    return subprocess.run([python_bin(), BENCH, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_list_names_moe_layer(python_env):
    proc = bench("--list", env=python_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "moe_layer" in proc.stdout


def test_unknown_benchmark_exits_2_naming_the_known_ones(python_env):
    proc = bench("no_such_bench", "--quick", env=python_env, timeout=60)
    assert proc.returncode == 2
    assert "no_such_bench" in proc.stderr and "moe_layer" in proc.stderr


def test_moe_layer_quick_writes_the_schema(python_env, tmp_path):
    out = tmp_path / "moe_layer.json"
    proc = bench("moe_layer", "--quick", "--json", str(out), env=python_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ep2" in proc.stdout  # the human table

    result = json.loads(out.read_text())
    assert list(result)[:5] == ["name", "params", "rows", "ratios", "env"]
    assert result["name"] == "moe_layer"
    assert result["params"]["tokens_per_rank"] > 0 and result["params"]["quick"] is True
    for key in ("torch", "megatron_core", "cpu_count", "hostname"):
        assert result["env"][key], key

    rows = {row["variant"]: row for row in result["rows"]}
    assert {"ep1", "ep2"} <= rows.keys()
    for variant, row in rows.items():
        assert row["ep_size"] == int(variant.removeprefix("ep"))
        for metric in ("step_time_s", "tokens_per_s"):
            assert math.isfinite(row[metric]) and row[metric] > 0, (variant, metric)
        assert len(row["samples"]) == result["params"]["repeats"]
        assert 0 <= row["alltoall_fraction"] < 1
        if row["ep_size"] == 1:
            assert row["alltoall_fraction"] == 0
        else:
            assert row["alltoall_fraction"] > 0
            assert row["alltoall_fraction"] == pytest.approx(
                row["alltoall_fwd_fraction"] + row["alltoall_bwd_fraction"])

    ratio = result["ratios"]["ep2/ep1_tokens_per_s"]
    assert ratio == pytest.approx(rows["ep2"]["tokens_per_s"] / rows["ep1"]["tokens_per_s"])


def test_smoes_quick_compares_routers(python_env, tmp_path):
    out = tmp_path / "smoes.json"
    proc = bench("smoes", "--quick", "--steps", "6", "--eval-items", "64",
                 "--variants", "baseline,smoes-gaussian", "--json", str(out), env=python_env,
                 timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert rows.keys() == {"baseline", "smoes-gaussian"}
    for row in rows.values():
        assert 0 <= row["msi"] <= 1 and 0 <= row["msi_expert"] <= 1
        assert 0 < row["bin_balancedness"] <= 1 and row["tokens_per_s"] > 0
        assert row["steps"] == 6 and len(row["msi_per_layer"]) == 2
    assert result["ratios"]["smoes-gaussian/baseline_msi"] == pytest.approx(
        rows["smoes-gaussian"]["msi"] / rows["baseline"]["msi"])


def test_dispatch_quick_compares_dispatchers_and_placements(python_env, tmp_path):
    out = tmp_path / "dispatch.json"
    proc = bench("dispatch", "--quick", "--json", str(out), env=python_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert rows.keys() == {"megatron-alltoall", "dedup", "dedup+bins", "dedup+traffic",
                           "dedup+traffic+shm", "baseline:megatron-alltoall",
                           "baseline:dedup+traffic", "baseline:dedup+traffic+shm"}
    assert all("time_model" not in row for row in rows.values())  # only with --timing barrier
    # The transport moves the same rows: bytes and rows equal, only the time differs.
    for key in ("cross_rank_bytes", "rows_sent", "floor_rows"):
        assert rows["dedup+traffic+shm"][key] == rows["dedup+traffic"][key], key
    assert rows["dedup+traffic+shm"]["detail"]["transport"] == "shm"
    for name, row in rows.items():
        assert row["step_time_s"] > 0 and len(row["samples"]) == result["params"]["repeats"]
        assert row["tokens_per_s"] == pytest.approx(
            result["params"]["tokens_per_step"] / row["step_time_s"])
        if row["detail"]["dispatcher"] == "alltoall":  # one row per remote (token, expert)
            assert row["rows_sent"] == row["detail"]["expert_rows"] > row["floor_rows"]
        else:  # one row per remote (token, rank): exactly the floor of its placement
            assert row["rows_sent"] == row["floor_rows"] < row["detail"]["expert_rows"]
        assert row["cross_rank_bytes"] == (row["detail"]["payload_bytes"]
                                           + row["detail"]["meta_bytes"])
    # Same model, inputs and placement: dedup sends exactly the rows megatron-core's floor says.
    assert rows["dedup"]["rows_sent"] == rows["megatron-alltoall"]["floor_rows"]
    assert rows["dedup+traffic"]["detail"]["migration_bytes_sent"] > 0
    ref = rows["megatron-alltoall"]
    assert result["ratios"]["dedup/megatron-alltoall_cross_rank_bytes"] == pytest.approx(
        rows["dedup"]["cross_rank_bytes"] / ref["cross_rank_bytes"])
    # Communication time (dispatch.timing): forward + backward, slowest rank, parts that add up.
    for name, row in rows.items():
        timing = row["detail"]["comm_time"]
        assert 0 < row["comm_seconds_min"] <= row["comm_seconds"] < row["step_time_s"]
        assert len(row["comm_samples"]) == result["params"]["repeats"]
        # The slowest rank's total: at most the slowest forward plus the slowest backward.
        assert max(timing["forward_seconds"], timing["backward_seconds"]) <= timing["seconds"] \
            <= timing["forward_seconds"] + timing["backward_seconds"] + 1e-12
        for d in ("forward", "backward"):
            for p in ("dispatch", "combine"):
                parts = timing["parts"][d][p]
                assert parts["collective"] > 0, (name, d, p)
                assert parts["total"] == pytest.approx(sum(v for k, v in parts.items()
                                                           if k != "total"))
    assert result["ratios"]["dedup+traffic+shm/megatron-alltoall_comm_seconds"] == pytest.approx(
        rows["dedup+traffic+shm"]["comm_seconds"] / ref["comm_seconds"])


def test_dispatch_timing_barrier_scores_the_time_model_on_the_other_model(python_env, tmp_path):
    out = tmp_path / "dispatch.json"
    proc = bench("dispatch", "--quick", "--timing", "barrier", "--json", str(out),
                 env=python_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for row in result["rows"]:
        tm = row["time_model"]
        # fitted on the SMoES model's variants, scored on the baseline model's
        assert tm["in_situ_split"] == ("score" if row["variant"].startswith("baseline:")
                                       else "fit"), row["variant"]
        transport = "shm" if row["detail"]["transport"] == "shm" else "gloo"
        parts = row["detail"]["comm_time"]["parts"]
        for way in ("microbench", "in_situ"):
            model = tm[way]
            assert model["preset"].startswith(f"cpu-{transport}@")
            assert model["predicted_s"] > 0 and model["bandwidth_GBps"] > 0
            # measured: the slowest rank's collectives, every direction and phase
            assert model["measured_s"] == pytest.approx(sum(
                parts[d][p]["collective"] for d in ("forward", "backward")
                for p in ("dispatch", "combine")))
            assert model["relative_error"] == pytest.approx(
                model["predicted_s"] / model["measured_s"] - 1)
        # the same bandwidth; in situ only the fixed cost per collective is refitted
        assert tm["in_situ"]["bandwidth_GBps"] == tm["microbench"]["bandwidth_GBps"]
        calls = {k: v["collectives"] for k, v in tm["in_situ"]["phases"].items()}
        layers = len(row["detail"]["traffic_LPRR"]["payload"])
        if row["detail"]["dispatcher"] == "alltoall":  # rows and probs apart
            assert calls["forward/dispatch"] == calls["backward/dispatch"] == 2 * layers
        else:  # split counts, then rows and metadata packed
            assert calls["forward/dispatch"] == 2 * layers
            assert calls["backward/dispatch"] == layers
        key = f"{row['variant']}/time_model_in_situ_relative_error_{tm['in_situ_split']}"
        assert result["ratios"][key] == tm["in_situ"]["relative_error"]


def test_phase_timing_quick_pairs_timer_off_and_on(python_env, tmp_path):
    out = tmp_path / "phase_timing.json"
    proc = bench("phase-timing", "--quick", "--json", str(out), env=python_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["alltoall", "dedup", "dedup+shm"]
    for row in result["rows"]:
        assert len(row["samples_off"]) == len(row["samples_on"]) == result["params"]["pairs"]
        assert 0 < row["comm_seconds"] < row["step_time_on_s"]
        assert result["ratios"][f"{row['variant']}:on/off_paired"] == row["on/off_paired"] > 0

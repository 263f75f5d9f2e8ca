"""`bench.py checkpoint --quick` as a user runs it: real gloo ranks, the JSON schema, and the
per-rank read volume the DCP format exists for (a rank reads less than v1's every-file load)."""

from __future__ import annotations

import json

from tests.test_bench import bench


def test_checkpoint_quick_compares_v1_and_dcp(python_env, tmp_path):
    out = tmp_path / "checkpoint.json"
    proc = bench("checkpoint", "--quick", "--json", str(out), env=python_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["name"] == "checkpoint" and result["params"]["quick"] is True
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["v1", "dcp", "dcp-async"]
    for row in rows.values():
        assert row["save_s"] > 0 and row["load_s"] > 0 and row["checkpoint_mib"] > 0
    # EP=2: a DCP rank reads the dense tensors and half of the experts, v1 every rank's file
    assert rows["dcp"]["max_bytes_read_per_rank"] < rows["v1"]["max_bytes_read_per_rank"]
    assert rows["dcp-async"]["save_blocking_s"] <= rows["dcp-async"]["save_s"]
    assert 0 < result["ratios"]["dcp/v1_max_bytes_read_per_rank"] < 1

"""`bench.py smoes --seeds`: one real training run per (variant, seed), summarised as mean and
sample standard deviation per variant, with each seed's values kept."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.test_bench import bench


def test_smoes_bench_over_seeds_reports_mean_and_spread(python_env, tmp_path):
    out, work = tmp_path / "smoes.json", tmp_path / "work"
    args = ("smoes", "--quick", "--steps", "3", "--eval-items", "32", "--variants",
            "smoes-gaussian", "--seeds", "3,11", "--workdir", str(work), "--json", str(out))
    proc = bench(*args, env=python_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["params"]["seeds"] == [3, 11]
    (row,) = result["rows"]
    assert row["variant"] == "smoes-gaussian" and row["seeds"] == [3, 11]
    assert [s["seed"] for s in row["per_seed"]] == [3, 11]
    for metric in ("eval_accuracy", "msi", "msi_expert", "bin_balancedness"):
        values = [s[metric] for s in row["per_seed"]]
        assert row[metric] == pytest.approx(statistics.fmean(values))
        assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
    # different seeds give different initial weights, so different models
    assert row["per_seed"][0]["final_loss"] != row["per_seed"][1]["final_loss"]

    # --workdir keeps every run; the same command again trains nothing and reports the same
    runs = work / "tiny-vqa"
    assert {d.name for d in runs.iterdir()} == {"smoes-gaussian-seed3", "smoes-gaussian-seed11"}
    again = bench(*args, env=python_env, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("smoes: reusing") == 2
    assert json.loads(out.read_text())["rows"][0]["per_seed"] == row["per_seed"]


@pytest.mark.parametrize("seeds", ["1,1", "-3", "x"])
def test_smoes_bench_rejects_bad_seeds(python_env, seeds):
    proc = bench("smoes", "--seeds", seeds, env=python_env, timeout=120)
    assert proc.returncode == 2 and "--seeds" in proc.stderr

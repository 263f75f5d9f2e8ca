"""The embedded default job, as README.md runs it: the tiny MoE-VLM (convolutional vision stem,
16 vision tokens) on easy-vqa, EP over two CPU ranks, scored on the whole test split (test images
it never trained on). The issue's goal: >= 95% (majority answer: 37%)."""

from __future__ import annotations

from tests.conftest import ROOT
from tests.launch import check, run, sets, summary, torchrun_cmd


def test_tiny_config_learns_easy_vqa(tmp_path):
    args = ["--config", str(ROOT / "launch/configs/tiny-vqa.yaml"),
            *sets(train__output_dir=tmp_path, train__progress="false")]
    check(run(torchrun_cmd("epruntime.train", 2, *args), timeout=1800))
    s = summary(tmp_path)
    print(s)
    assert s["world_size"] == 2 and s["ep_size"] == 2 and s["eval_items"] == 9673
    assert s["vision_tokens"] == 16
    assert 0.36 < s["majority_baseline"] < 0.38
    assert s["eval_accuracy"] >= 0.95
    assert s["seconds"] <= 15 * 60

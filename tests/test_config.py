import sys

import pytest

from epruntime.config import (Config, ConfigError, check_backend_available, check_metrics_port,
                              check_world, load_config)
from tests.conftest import ROOT
from tests.launch import run

TINY = ROOT / "launch/configs/tiny-vqa.yaml"


def test_tiny_config_loads_and_is_fine_grained():
    cfg = load_config(TINY)
    assert cfg.model.num_experts >= 32 and cfg.model.moe_topk >= 4
    assert cfg.parallel.ep_size == 2 and cfg.data.dataset == "easy-vqa"


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["parallel.ep_size=4", "train.lr=1e-3", "train.resume=false",
                             "data.max_train_items=null", "train.output_dir=/tmp/x"])
    assert cfg.parallel.ep_size == 4 and cfg.train.lr == 1e-3 and cfg.train.resume is False
    assert str(cfg.train.output_dir) == "/tmp/x"


@pytest.mark.parametrize("override, named", [
    ("model.hidden_sise=64", "model.hidden_sise: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("train.max_steps=many", "train.max_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("parallel.ep_size=3", "parallel.ep_size=3 does not divide model.num_experts=32"),
    ("model.moe_topk=64", "model.moe_topk=64 exceeds model.num_experts=32"),
    ("parallel.backend=mpi", "parallel.backend"),
    ("data.dataset=coco", "data.dataset"),
])
def test_bad_values_name_the_field(override, named):
    with pytest.raises(ConfigError, match="invalid config") as err:
        load_config(TINY, [override])
    assert named in str(err.value)


@pytest.mark.parametrize("override", ["no-equals-sign", "=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_world_checks():
    cfg = load_config(TINY)  # ep 2, global batch 64
    assert check_world(cfg, 2) == 2 and check_world(cfg, 4) == 4
    with pytest.raises(ConfigError, match="parallel.ep_size=2 does not divide the world size 3"):
        check_world(cfg, 3)
    odd = load_config(TINY, ["data.global_batch_size=66"])
    with pytest.raises(ConfigError, match="data.global_batch_size=66 is not divisible"):
        check_world(odd, 4)


def test_fingerprint_tracks_every_field():
    a, b = Config(), Config()
    assert a.fingerprint() == b.fingerprint()
    b.train.lr = 0.5
    assert a.fingerprint() != b.fingerprint()


def test_overrides_leave_the_input_untouched():
    from epruntime.config import apply_overrides

    raw = {"model": {"hidden_size": 64}}
    out = apply_overrides(raw, ["model.hidden_size=32"])
    assert out["model"]["hidden_size"] == 32 and raw["model"]["hidden_size"] == 64


# (id, overrides on TINY, the whole error message)
NAMED_ERRORS = [
    ("train-output-dir-unset", ["train.output_dir="],
     "invalid config: train.output_dir: must be a non-empty path (got None); set it to a "
     "directory, e.g. --set train.output_dir=runs/train"),
    ("train-output-dir-empty", ["train.output_dir=''"],
     "invalid config: train.output_dir: must be a non-empty path (got ''); set it to a "
     "directory, e.g. --set train.output_dir=runs/train"),
    ("infer-output-dir-unset", ["infer.output_dir="],
     "invalid config: infer.output_dir: must be a non-empty path (got None); set it to a "
     "directory, e.g. --set infer.output_dir=runs/infer"),
    ("trace-path-empty", ["trace.path=' '"],
     "invalid config: trace.path: must be a non-empty path (got ' '); leave it out (null) for "
     "<train/infer output_dir>/traces, or name a directory"),
    ("metrics-port-past-65535", ["metrics.enabled=true", "metrics.port=65535",
                                 "dispatch.ranks_per_node=2"],
     "invalid config: metrics.port=65535: rank on local index 1 would bind 65536; metrics.port "
     "+ dispatch.ranks_per_node - 1 must be <= 65535 (dispatch.ranks_per_node=2: lower "
     "metrics.port to at most 65534)"),
    ("lr-absurd", ["train.lr=1e6"],
     "invalid config: train.lr=1000000.0: learning rates above 10 diverge; expected a value "
     "like 3e-3"),
    ("min-lr-absurd", ["train.min_lr=50"],
     "invalid config: train.min_lr=50.0: learning rates above 10 diverge; expected a value "
     "like 3e-3"),
    ("min-lr-above-lr", ["train.lr=3e-3", "train.min_lr=1e-2"],
     "invalid config: train.min_lr=0.01 exceeds train.lr=0.003: the schedule decays from "
     "train.lr down to train.min_lr; set train.min_lr <= train.lr"),
    ("lr-inf", ["train.lr=inf"],
     "invalid config: train.lr: Input should be a finite number (got 'inf')"),
    ("lr-nan", ["train.lr=.nan"],
     "invalid config: train.lr: Input should be a finite number (got nan)"),
    ("min-lr-inf", ["train.min_lr=.inf"],
     "invalid config: train.min_lr: Input should be a finite number (got inf)"),
    ("grad-clip-inf", ["train.grad_clip=.inf"],
     "invalid config: train.grad_clip: Input should be a finite number (got inf)"),
    ("weight-decay-nan", ["train.weight_decay=nan"],
     "invalid config: train.weight_decay: Input should be a finite number (got 'nan')"),
    ("timeout-inf", ["parallel.timeout_s=.inf"],
     "invalid config: parallel.timeout_s: Input should be a finite number (got inf)"),
    ("aux-coeff-inf", ["model.moe_aux_loss_coeff=.inf"],
     "invalid config: model.moe_aux_loss_coeff: Input should be a finite number (got inf)"),
    ("smoes-coeff-nan", ["smoes.mi_coeff=.nan"],
     "invalid config: smoes.mi_coeff: Input should be a finite number (got nan)"),
    ("sample-rate-nan", ["trace.sample_rate=.nan"],
     "invalid config: trace.sample_rate: Input should be a finite number (got nan)"),
    ("retention-nan", ["fastmmoe.retention=[0.5, .nan]"],
     "invalid config: fastmmoe.retention=[0.5, nan]: each value must be a finite fraction in "
     "[0, 1]"),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in NAMED_ERRORS],
                         ids=[c[0] for c in NAMED_ERRORS])
def test_named_error_lines(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    ["trace.path="],  # null: the default <output_dir>/traces
    ["train.lr=10", "train.min_lr=10"],  # the largest accepted, min_lr == lr
    ["metrics.port=65535", "dispatch.ranks_per_node=2"],  # metrics off: nothing binds
    ["metrics.enabled=true", "metrics.port=65534", "dispatch.ranks_per_node=2"],
])
def test_edge_values_still_load(overrides):
    load_config(TINY, overrides)


def test_no_default_is_non_finite_or_empty():
    cfg = load_config(None)  # the defaults (tests and benchmarks rely on it)
    assert cfg == Config() and str(cfg.train.output_dir) and cfg.trace.path is None


# (id, file text, message after "--config PATH: ")
BAD_FILES = [
    ("duplicate-key", "train:\n  lr: 1.0e-3\n  max_steps: 3\n  lr: 2.0e-3\n",
     "line 4: duplicate key 'lr' (in train; first at line 2); remove one of them"),
    ("duplicate-section", "model:\n  hidden_size: 64\ntrain:\n  max_steps: 3\nmodel:\n"
     "  num_layers: 1\n",
     "line 5: duplicate key 'model' (at the top level; first at line 1); remove one of them"),
    ("duplicate-nested", "fastmmoe:\n  layers: [0]\n  vision_topk: [{a: 1, a: 2}]\n",
     "line 3: duplicate key 'a' (in fastmmoe.vision_topk[0]; first at line 3); remove one of "
     "them"),
    ("empty", "",
     "the file is empty (expected sections such as model:, parallel:, train:)"),
    ("only-comments", "# nothing here yet\n\n",
     "the file is empty (expected sections such as model:, parallel:, train:)"),
    ("null", "null\n",
     "the file is empty (expected sections such as model:, parallel:, train:)"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_named_line(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"--config {path}: {message}"


def test_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train: &t\n  max_steps: 3\ninfer:\n  output_dir: x\n"
                    "data: {<<: {global_batch_size: 8}, global_batch_size: 16}\n")
    assert load_config(path).data.global_batch_size == 16


@pytest.mark.parametrize("port, local_world_size, message", [
    (65535, 1, None),
    (65534, 2, None),
    (65535, 2, "metrics.port=65535: rank on local index 1 would bind 65536; metrics.port + "
               "LOCAL_WORLD_SIZE - 1 must be <= 65535 (LOCAL_WORLD_SIZE=2: lower metrics.port "
               "to at most 65534)"),
    (65530, 8, "metrics.port=65530: rank on local index 7 would bind 65537; metrics.port + "
               "LOCAL_WORLD_SIZE - 1 must be <= 65535 (LOCAL_WORLD_SIZE=8: lower metrics.port "
               "to at most 65528)"),
])
def test_check_metrics_port(port, local_world_size, message):
    cfg = load_config(None, ["metrics.enabled=true", f"metrics.port={port}"])
    if message is None:
        check_metrics_port(cfg, local_world_size)
    else:
        with pytest.raises(ConfigError) as err:
            check_metrics_port(cfg, local_world_size)
        assert str(err.value) == message
    check_metrics_port(load_config(None, [f"metrics.port={port}"]), local_world_size)  # off


@pytest.mark.parametrize("backend, gpus, message", [
    ("nccl", False, "parallel.backend=nccl needs CUDA GPUs, and torch sees none "
                    "(torch.cuda.is_available() is False); use parallel.backend=gloo or auto"),
    ("nccl", True, None),
    ("gloo", False, None),
    ("auto", False, None),
])
def test_check_backend_available(monkeypatch, backend, gpus, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    cfg = load_config(None, [f"parallel.backend={backend}"])
    if message is None:
        check_backend_available(cfg)
    else:
        with pytest.raises(ConfigError) as err:
            check_backend_available(cfg)
        assert str(err.value) == message


@pytest.mark.parametrize("text, args, message", [
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", [],
     "line 3: duplicate key 'lr' (in train; first at line 2); remove one of them"),
    ("# only a comment\n", [],
     "the file is empty (expected sections such as model:, parallel:, train:)"),
    ("train:\n  max_steps: 3\n", ["--set", "train.lr=1e6"],
     "invalid config: train.lr=1000000.0: learning rates above 10 diverge; expected a value "
     "like 3e-3"),
], ids=["duplicate-key", "empty", "absurd-lr"])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, text, args, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    proc = run([sys.executable, "-m", "epruntime.train", "--config", str(path), *args], timeout=60)
    assert proc.returncode == 2, proc.stderr
    prefix = "" if message.startswith("invalid config") else f"--config {path}: "
    assert proc.stderr.splitlines() == [f"epruntime.train: error: {prefix}{message}"]

import pytest

from epruntime.config import Config, ConfigError, check_world, load_config
from tests.conftest import ROOT

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

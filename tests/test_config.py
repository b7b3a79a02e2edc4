import pytest

from imgclf.config import RunConfig, apply_override, dump_yaml, load_config
from imgclf.errors import ImgclfError


def test_empty_config_is_all_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("")
    assert load_config(f) == RunConfig()


def test_yaml_and_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  image_size: 64\n  split: {train: 0.8, val: 0.2, test: 0}\n")
    cfg = load_config(f, ["data.scan.min_side=16", "seed=7", "data.scan.follow_symlinks=none"])
    assert cfg.data.image_size == 64
    assert cfg.data.split.fractions() == {"train": 0.8, "val": 0.2}
    assert cfg.data.scan.min_side == 16 and cfg.seed == 7
    assert cfg.data.scan.follow_symlinks == "none"


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("data.image_sise=3", "data.image_size"),
        ("data.splitt.train=1", "data.split"),
        ("data.split.tran=0.5", "data.split.train"),
        ("dta.root=x", "data"),
    ],
)
def test_unknown_keys_suggest_the_nearest(override, suggestion):
    with pytest.raises(ImgclfError, match=rf"did you mean {suggestion}\?"):
        load_config(None, [override])


def test_invalid_values_name_the_key():
    with pytest.raises(ImgclfError, match=r"data\.scan\.min_side"):
        load_config(None, ["data.scan.min_side=0"])
    with pytest.raises(ImgclfError, match=r"sum to 1"):
        load_config(None, ["data.split.train=0.9"])
    with pytest.raises(ImgclfError, match="follow_symlinks"):
        load_config(None, ["data.scan.follow_symlinks=sometimes"])


def test_malformed_inputs(tmp_path):
    with pytest.raises(ImgclfError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ImgclfError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ImgclfError, match=r"section\.key=value"):
        apply_override({}, "novalue")
    with pytest.raises(ImgclfError, match="is a value, not a section"):
        apply_override({"seed": 1}, "seed.x=2")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.image_size=96", "data.root=/data/x"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg
    assert "max_pixels: 89478485" in f.read_text()


def test_overrides_index_into_lists_of_defaults():
    cfg = load_config(None, ["train.stages.0.lr=0.5", "train.stages.0.trainable=head"])
    assert cfg.train.stages[0].lr == 0.5 and cfg.train.stages[0].trainable == "head"
    with pytest.raises(ImgclfError, match="'3' is not an index of a 2-item list"):
        load_config(None, ["train.stages.3.lr=0.5"])


def test_unknown_keys_inside_a_stage_suggest_the_nearest():
    with pytest.raises(ImgclfError, match=r"did you mean train\.stages\.0\.epochs\?"):
        load_config(None, ["train.stages=[{epoks: 2}]"])

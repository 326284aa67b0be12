"""config.py: the shipped defaults, override parsing, and the one-line ConfigError for every kind of bad input."""
import dataclasses
import math
import os
import subprocess
import sys
import typing

import pytest
import yaml

from config import (
    DEFAULT_CONFIG,
    SECTIONS,
    Config,
    config_from_dict,
    dump,
    load_config,
    parse_override,
    to_dict,
)
from ddpm.config_rules import ConfigError, check_batch_split, schedule_warning
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raises_config_error(overrides, *fragments, path=None):
    """Assert that loading raises a one-line ConfigError (a UserError) whose message has every fragment."""
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert isinstance(e.value, UserError)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ---- defaults --------------------------------------------------------------------------------------------------

def test_default_is_cifar10_yaml_with_the_papers_values():
    assert DEFAULT_CONFIG == os.path.join(ROOT, "configs", "cifar10.yaml")
    cfg = load_config(None)
    assert load_config(DEFAULT_CONFIG) == cfg
    assert cfg.name == "cifar10"
    d, m, df, t, s = cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.sample
    # Ho et al. 2020, Appendix B (CIFAR-10)
    assert (d.dataset, d.image_size, d.channels, d.hflip) == ("cifar10", 32, 3, True)
    assert (m.base_channels, m.channel_mults, m.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (m.attention_resolutions, m.num_heads, m.dropout, m.num_classes) == ((16,), 1, 0.1, None)
    assert (df.timesteps, df.beta_schedule, df.objective) == (1000, "linear", "eps")
    assert df.beta_start == 1e-4 and df.beta_end == 0.02
    assert isinstance(df.beta_start, float) and isinstance(df.beta_end, float)
    assert (t.max_steps, t.batch_size, t.optimizer, t.lr, t.warmup_steps) == (800_000, 128, "adam", 2e-4, 5000)
    assert (t.grad_clip, t.ema_decay, t.grad_accum) == (1.0, 0.9999, 1)
    assert df.variance == "fixed_large"
    assert (s.sampler, s.steps, s.eta) == ("ddim", 100, 0.0)


def test_yaml_file_agrees_with_the_loaded_config():
    """Every value written in cifar10.yaml ends up in the Config (lists as tuples), nothing silently dropped."""
    with open(DEFAULT_CONFIG) as f:
        raw = yaml.safe_load(f)
    cfg = load_config(None)
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            expected = tuple(value) if isinstance(value, list) else value
            if isinstance(got, float):
                expected = float(expected)
            assert got == expected, (section, key, got, value)


def test_name_defaults_to_the_file_name(tmp_path):
    p = tmp_path / "my_run.yaml"
    p.write_text("model:\n  base_channels: 64\n")
    cfg = load_config(str(p))
    assert cfg.name == "my_run" and cfg.model.base_channels == 64
    assert cfg.model.channel_mults == (1, 2, 2, 2)   # unspecified fields keep the dataclass defaults
    p.write_text("name: other\n")
    assert load_config(str(p)).name == "other"
    p.write_text("")                                   # an empty file is all defaults
    assert load_config(str(p)) == dataclasses.replace(Config(), name="my_run")


# ---- overrides ---------------------------------------------------------------------------------------------------

def test_overrides_parse_yaml_scalars_and_lists():
    # YAML 1.1 reads '1e-4' (no dot) as a string: floats must accept it
    assert isinstance(yaml.safe_load("1e-4"), str)
    cfg = load_config(None, ["model.channel_mults=[1,2]", "diffusion.beta_start=1e-4", "diffusion.beta_end=3e-2",
                             "model.num_classes=null", "train.batch_size=64", "data.hflip=false",
                             "train.lr=3.0e-4", "model.dropout=0", "data.image_size=16", "name=run7",
                             "diffusion.objective=v", "train.compile=true", "data.preload=auto"])
    assert cfg.model.channel_mults == (1, 2) and isinstance(cfg.model.channel_mults, tuple)
    assert cfg.diffusion.beta_start == 1e-4 and type(cfg.diffusion.beta_start) is float
    assert cfg.diffusion.beta_end == 0.03 and type(cfg.diffusion.beta_end) is float
    assert cfg.model.num_classes is None
    assert cfg.train.batch_size == 64 and type(cfg.train.batch_size) is int
    assert cfg.data.hflip is False
    assert cfg.train.lr == 3e-4
    assert cfg.model.dropout == 0.0 and type(cfg.model.dropout) is float   # an int is a fine float
    assert cfg.data.image_size == 16 and cfg.name == "run7"
    assert cfg.diffusion.objective == "v"
    assert cfg.train.compile is True and cfg.data.preload == "auto"


def test_num_classes_forms():
    assert load_config(None, ["model.num_classes=10"]).model.num_classes == 10
    assert load_config(None, ["model.num_classes=auto"]).model.num_classes == "auto"
    assert load_config(None, ["model.num_classes=null"]).model.num_classes is None
    raises_config_error(["model.num_classes=0"], "model.num_classes")
    raises_config_error(["model.num_classes=many"], "model.num_classes")
    raises_config_error(["model.num_classes=true"], "model.num_classes")


def test_single_int_becomes_a_one_element_tuple():
    assert load_config(None, ["model.attention_resolutions=8"]).model.attention_resolutions == (8,)
    assert load_config(None, ["model.attention_resolutions=[]"]).model.attention_resolutions == ()


def test_later_overrides_win_and_values_may_contain_equals():
    cfg = load_config(None, ["train.batch_size=64", "train.batch_size=32"])
    assert cfg.train.batch_size == 32
    assert parse_override("data.root=/tmp/a=b") == ("data.root", "/tmp/a=b")
    assert parse_override(" data.root =x") == ("data.root", "x")


def test_malformed_overrides():
    raises_config_error(["train.batch_size"], "train.batch_size", "section.field=value")
    raises_config_error(["=3"], "=3")
    raises_config_error(["model.channel_mults=[1,2"], "model.channel_mults=[1,2")


# ---- errors --------------------------------------------------------------------------------------------------------

def test_unknown_section_and_field():
    raises_config_error(["modle.base_channels=3"], "modle.base_channels", "model", "diffusion", "train")
    raises_config_error(["model=3"], "'model'")
    msg = raises_config_error(["model.nope=1"], "model.nope")
    for f in dataclasses.fields(type(Config().model)):  # the valid fields are listed
        assert f.name in msg, (f.name, msg)
    with pytest.raises(ConfigError, match="modle"):
        config_from_dict({"modle": {"base_channels": 3}})
    with pytest.raises(ConfigError, match="model.width"):
        config_from_dict({"model": {"width": 3}})
    with pytest.raises(ConfigError, match="'model'"):
        config_from_dict({"model": [1, 2]})
    with pytest.raises(ConfigError):
        config_from_dict([1, 2])


@pytest.mark.parametrize("override, key", [
    ("model.base_channels=abc", "model.base_channels"),
    ("model.base_channels=1.5", "model.base_channels"),
    ("model.base_channels=true", "model.base_channels"),   # a bool is not an int
    ("model.channel_mults=[1,x]", "model.channel_mults"),
    ("model.channel_mults=abc", "model.channel_mults"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),
    ("data.channels=2", "data.channels"),
    ("data.hflip=maybe", "data.hflip"),
    ("diffusion.beta_schedule=quadratic", "diffusion.beta_schedule"),
    ("sample.sampler=euler", "sample.sampler"),
    ("sample.spacing=karras", "sample.spacing"),
    ("sample.order=2.5", "sample.order"),
    ("sample.dynamic_threshold=sometimes", "sample.dynamic_threshold"),
    ("train.batch_size=[64]", "train.batch_size"),
])
def test_wrong_type_names_the_key(override, key):
    msg = raises_config_error([override], key)
    assert "must be" in msg


def test_wrong_type_in_a_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: lots\n")
    raises_config_error([], "train.batch_size", path=str(p))


@pytest.mark.parametrize("overrides, fragments", [
    (["train.max_steps=-1"], ["train.max_steps"]),
    (["train.warmup_steps=-5"], ["train.warmup_steps"]),
    (["train.batch_size=0"], ["train.batch_size"]),
    (["train.save_every=0"], ["train.save_every"]),
    (["sample.steps=1001"], ["sample.steps", "1000"]),
    (["sample.steps=0"], ["sample.steps"]),
    (["diffusion.timesteps=50", "sample.steps=51"], ["sample.steps", "50"]),
    (["train.batch_size=10", "train.grad_accum=3"], ["train.batch_size", "train.grad_accum"]),
    (["diffusion.timesteps=0"], ["diffusion.timesteps"]),
    (["diffusion.beta_start=0.03"], ["diffusion.beta_start"]),
    (["diffusion.beta_end=1.0"], ["diffusion.beta_end"]),
    (["model.dropout=1.0"], ["model.dropout"]),
    (["train.ema_decay=1.0"], ["train.ema_decay"]),
    (["train.lr=0"], ["train.lr"]),
    (["model.channel_mults=[]"], ["model.channel_mults"]),
    (["model.channel_mults=[1,0]"], ["model.channel_mults"]),
    (["data.image_size=28"], ["data.image_size", "model.channel_mults"]),   # 28 is not divisible by 2^3
    (["data.image_size=4"], ["data.image_size"]),
    (["sample.eta=-0.1"], ["sample.eta"]),
    (["train.cond_drop_prob=1.0"], ["train.cond_drop_prob"]),
    (["diffusion.timesteps=1", "sample.steps=1"], ["diffusion.timesteps", "[2, inf)"]),
    (["model.num_heads=3"], ["model.num_heads=3", "256"]),  # cifar10: 256 channels at 16x16 and in the middle
    (["sample.guidance_scale=2"], ["sample.guidance_scale", "class-conditional"]),
    (["sample.order=4"], ["sample.order", "[1, 3]"]),
    (["sample.order=0"], ["sample.order", "[1, 3]"]),
    (["sample.sampler=dpmpp", "sample.eta=0.5"], ["sample.eta", "DPM-Solver++", "deterministic"]),
])
def test_out_of_range_values_raise(overrides, fragments):
    raises_config_error(overrides, *fragments)


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["train.max_steps=0", "sample.steps=1000", "train.batch_size=12", "train.grad_accum=3",
                             "data.image_size=28", "model.channel_mults=[1,2,2]", "sample.steps=1"])
    assert (cfg.train.max_steps, cfg.sample.steps, cfg.train.grad_accum) == (0, 1, 3)
    assert load_config(None, ["sample.steps=1000"]).sample.steps == 1000


def test_config_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path))


def test_missing_and_invalid_files(tmp_path):
    missing = str(tmp_path / "none.yaml")
    raises_config_error([], missing, "not found", path=missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n  base: {\n")
    raises_config_error([], str(bad), "not valid YAML", path=str(bad))


# ---- serialisation and the command line ---------------------------------------------------------------------------

def test_to_dict_is_plain_and_round_trips():
    cfg = load_config(None, ["model.channel_mults=[1,2]", "data.image_size=16", "model.num_classes=10",
                             "diffusion.beta_schedule=cosine", "train.lr=1e-3"])
    d = to_dict(cfg)
    assert d["model"]["channel_mults"] == [1, 2] and isinstance(d["model"]["channel_mults"], list)
    assert d["name"] == "cifar10" and d["train"]["lr"] == 1e-3
    assert config_from_dict(d) == cfg
    assert config_from_dict(yaml.safe_load(dump(cfg))) == cfg


def test_cli_turns_config_errors_into_exit_code_2():
    code = ("import sys; sys.path.insert(0, %r); from ddpm.cli import cli; from config import load_config; "
            "cli(lambda: load_config(None, ['model.nope=1']))()") % ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.nope" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_batch_split_over_processes_and_micro_batches():
    """One rule for the global batch, at load time (1 process) and again once the number of processes is known."""
    train = load_config(None, ["train.batch_size=12", "train.grad_accum=3"]).train
    check_batch_split(train, world=2)  # 12 = 2 x 3 x 2
    with pytest.raises(ConfigError, match="train.batch_size=12 .* 5 x 3"):
        check_batch_split(train, world=5)


@pytest.mark.parametrize("timesteps, schedule, warns", [(1000, "linear", False), (50, "linear", True),
                                                       (50, "cosine", False), (200, "linear", True)])
def test_schedule_warning_when_x_T_keeps_signal(timesteps, schedule, warns):
    """sqrt(alpha-bar_T) from the betas in float64 by hand: above 0.05 the run is warned, with a fix named."""
    d = load_config(None, [f"diffusion.timesteps={timesteps}", f"diffusion.beta_schedule={schedule}",
                           "sample.steps=10"]).diffusion
    warning = schedule_warning(d)
    assert (warning is not None) == warns
    if warns:
        betas = [1e-4 + (0.02 - 1e-4) * i / (timesteps - 1) for i in range(timesteps)]
        signal = math.sqrt(math.prod(1 - b for b in betas))
        assert f"x_T = {signal:.2f} x_0" in warning and "beta_schedule=cosine" in warning
        assert "\n" not in warning


def test_stored_configs_without_the_new_sampler_fields_take_the_defaults():
    """A checkpoint's config from before sample.order, sample.spacing and sample.dynamic_threshold existed."""
    d = to_dict(load_config(None))
    for key in ("order", "spacing", "dynamic_threshold"):
        del d["sample"][key]
    s = config_from_dict(d).sample
    assert (s.order, s.spacing, s.dynamic_threshold) == (2, "linspace", False)
    s = config_from_dict(d, ["sample.sampler=dpmpp", "sample.order=3", "sample.spacing=logsnr"]).sample
    assert (s.sampler, s.order, s.spacing, s.eta) == ("dpmpp", 3, "logsnr", 0.0)


# one value outside its range for every numeric field: what a user could mistype
OUT_OF_RANGE = {
    "data.image_size": 4, "data.num_images": 0, "data.seed": -1, "data.preload_max_gib": 0,
    "model.base_channels": 0, "model.num_res_blocks": 0, "model.num_heads": 0, "model.dropout": 1.0,
    "model.norm_eps": 0, "diffusion.timesteps": 1, "diffusion.beta_start": 0, "diffusion.beta_end": 1.0,
    "model.text_max_tokens": 1, "model.text_width": 0, "model.text_layers": 0,
    "train.max_steps": -1, "train.batch_size": 0, "train.lr": 0, "train.weight_decay": -0.1,
    "train.warmup_steps": -1, "train.grad_clip": -1, "train.grad_accum": 0, "train.ema_decay": 1.0,
    "train.seed": -3, "train.log_every": 0, "train.save_every": 0, "train.sample_every": 0, "train.sample_n": 0,
    "train.keep_last": -1, "train.num_workers": -1, "train.max_nonfinite": 0, "train.cond_drop_prob": 1.0,
    "train.fid_every": -1, "train.fid_samples": 1, "sample.steps": 0, "sample.eta": 1.5, "sample.order": 4,
    "sample.n": 0, "sample.batch_size": 0, "sample.seed": -1, "diffusion.vlb_weight": -0.001,
    "train.nll_every": -1, "train.nll_images": 1,
    "autoencoder.latent_channels": 0, "autoencoder.ch": 0, "autoencoder.num_res_blocks": 0,
    "autoencoder.kl_weight": -1, "autoencoder.perceptual_weight": -1, "autoencoder.disc_weight": -1,
    "autoencoder.disc_start": -1, "autoencoder.lr": 0, "autoencoder.batch_size": 0, "autoencoder.steps": -1,
    "latent.encode_batch_size": 0,
    "distill.start_steps": 1, "distill.steps": 0, "distill.updates": 0, "distill.lr": 0, "distill.batch_size": 0,
    "distill.ema_decay": 1.0,
}


def numeric_fields():
    return sorted(f"{s}.{name}" for s, cls in SECTIONS.items()
                  for name, tp in typing.get_type_hints(cls).items() if tp in (int, float))


@pytest.mark.parametrize("key", numeric_fields())
def test_every_numeric_field_rejects_non_finite_and_out_of_range_values(key):
    for value in ([OUT_OF_RANGE[key]] if key in OUT_OF_RANGE else []) + ["nan", "inf", "-.inf"]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        assert key in str(e.value) and "\n" not in str(e.value), (key, value, str(e.value))
    assert key in OUT_OF_RANGE or key == "sample.guidance_scale"  # any finite guidance weight is meaningful

"""DeepseekConfig: HF round trip, validation errors that name the field, project options kept apart, presets;
reading config files (config_files) and comparing configs field by field."""

import json

import pytest
from conftest import ROOT, small_config

from deepseekmoe_jax import ConfigError, DeepseekConfig, ModelOptions
from deepseekmoe_jax.config import capacity, differing_fields, format_changes
from deepseekmoe_jax.config_files import apply_overrides, load_yaml, parse_value, read_config_file
from deepseekmoe_jax.model import layer_kinds, layer_plan, locate_layer

# The config.json of deepseek-moe-16b-base, field for field (spec).
CONFIG_16B = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}


def test_16b_config_json_round_trips(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG_16B))
    config = DeepseekConfig.from_hf(tmp_path)  # directory form
    assert config.n_routed_experts == 64 and config.num_experts_per_tok == 6 and config.head_dim == 128
    # Absent fields take the reference class defaults.
    assert config.aux_loss_alpha == 0.001 and config.seq_aux is True
    out = config.to_hf()
    for key, value in CONFIG_16B.items():
        assert out[key] == value, key
    # Only the class-default fields that were absent are added; options never leak into config.json.
    assert set(out) - set(CONFIG_16B) == {"aux_loss_alpha", "seq_aux", "pad_token_id"}
    assert not set(out) & {f for f in ModelOptions.__dataclass_fields__}
    # Writing and reading again is a fixed point.
    config.save_hf(tmp_path / "again.json")
    assert DeepseekConfig.from_hf(tmp_path / "again.json") == config


def test_16b_preset_is_the_real_config():
    preset = DeepseekConfig.from_file(ROOT / "configs" / "deepseekmoe-16b.yaml")
    real = DeepseekConfig.from_hf(CONFIG_16B)
    assert preset.to_hf(metadata=False) == real.to_hf(metadata=False)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"some_new_field": 1}, "some_new_field"),
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "beta": 1}}, "rope_scaling"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
        ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
        ({"num_attention_heads": 15}, "num_attention_heads"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "deepseek_v2"}, "model_type"),
        ({"n_routed_experts": 0}, "n_routed_experts"),
        ({"vocab_size": -3}, "vocab_size"),
        # Wrong JSON types: a quoted flag would be truthy, a quoted number would fail deep inside the model.
        ({"norm_topk_prob": "false"}, "norm_topk_prob"),
        ({"seq_aux": 0}, "seq_aux"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
        ({"n_shared_experts": True}, "n_shared_experts"),
        ({"max_position_embeddings": True}, "max_position_embeddings"),
        ({"hidden_size": 2048.0}, "hidden_size"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        ({"rope_theta": "1e4"}, "rope_theta"),
        ({"aux_loss_alpha": None}, "aux_loss_alpha"),
        ({"eos_token_id": "100001"}, "eos_token_id"),
    ],
)
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        DeepseekConfig.from_hf({**CONFIG_16B, **change})
    assert f"'{field}'" in str(err.value) or f"{field}=" in str(err.value), str(err.value)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        DeepseekConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        DeepseekConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object of config fields, found a list"):
        DeepseekConfig.from_hf(tmp_path)
    (tmp_path / "x.yaml").write_text("model:\n  hidden_size: 64\noptions:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        DeepseekConfig.from_file(tmp_path / "x.yaml")


def test_options_are_separate_and_validated():
    config = small_config(options={"dtype": "bfloat16", "moe_group_size": 16})
    assert config.options.dtype == "bfloat16" and "dtype" not in config.to_hf()
    with pytest.raises(ConfigError, match="options.dtype"):
        ModelOptions(dtype="float8")
    with pytest.raises(ConfigError, match="capacity_factor_train"):
        ModelOptions(capacity_factor_train=0)
    with pytest.raises(ConfigError, match="device_balance_groups"):
        small_config(options={"device_balance_groups": 3})  # 8 experts are not divisible into 3 groups
    # Config objects are hashable (NNX graph definitions hold them as static data) and compare by value.
    assert hash(config) == hash(small_config(options={"dtype": "bfloat16", "moe_group_size": 16}))
    assert config != small_config()


def test_overrides_and_values():
    raw = {"model": {"hidden_size": 8}, "options": {}}
    out = apply_overrides(raw, {"model.hidden_size": 16, "options.dtype": "bfloat16", "train.lr": 1e-3})
    assert out == {"model": {"hidden_size": 16}, "options": {"dtype": "bfloat16"}, "train": {"lr": 1e-3}}
    assert raw["model"]["hidden_size"] == 8
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("bfloat16") == "bfloat16"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = DeepseekConfig.from_file(path)
    assert config.vocab_size > 0
    plan = layer_plan(config)
    assert sum(seg.num_layers for seg in plan) == config.num_hidden_layers


def test_layer_plan_follows_the_reference_rule():
    for freq, first_k, layers in [(1, 1, 28), (2, 0, 5), (2, 1, 6), (3, 2, 10), (1, 0, 9)]:
        config = small_config(moe_layer_freq=freq, first_k_dense_replace=first_k, num_hidden_layers=layers)
        kinds = layer_kinds(config)
        expected = ["moe" if (i >= first_k and i % freq == 0) else "dense" for i in range(layers)]
        assert list(kinds) == expected
        for i in range(layers):
            s, pos, rep = locate_layer(config, i)
            seg = layer_plan(config)[s]
            assert seg.layer_index(rep, pos) == i and seg.kinds[pos] == kinds[i]
    plan_16b = layer_plan(DeepseekConfig.from_hf(CONFIG_16B))
    assert [(seg.kinds, seg.repeats) for seg in plan_16b] == [(("dense",), 1), (("moe",), 27)]


def test_capacity_formula():
    assert capacity(512, 6, 64, 1.25, 4) == 60  # ceil(512 * 6 * 1.25 / 64)
    assert capacity(512, 6, 64, None, 4) == 512  # no-drop: every token can have a slot at every expert
    assert capacity(8, 2, 64, 1.0, 4) == 4  # min_capacity
    assert capacity(4, 2, 2, 8.0, 1) == 4  # never more than the group size


def test_config_files_read_numbers_and_refuse_duplicate_keys(tmp_path):
    import yaml

    numbers = {"1e-5": 1e-5, "1E5": 1e5, "-2e-3": -2e-3, "1_000": 1000, ".5": 0.5, "+1.0e+3": 1e3, "1.0e-06": 1e-6}
    for text, value in numbers.items():
        assert load_yaml(f"x: {text}") == {"x": value}, text
        assert parse_value(text) == value, text
    for text in ("abc", ".", "1e", "e5", "1.2.3", "nan"):  # not numbers: strings as before
        assert load_yaml(f"x: {text}") == {"x": text}, text
    assert yaml.safe_load("x: 1e-5") == {"x": "1e-5"}  # the global SafeLoader is left alone
    # Merge keys may be overridden; a key written twice is refused with both lines.
    assert load_yaml("a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n")["b"] == {"x": 2}
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 1\n  eps: 1e-8\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4: duplicate key 'steps' \(first at line 2\)"):
        read_config_file(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert "\n" not in str(err.value) and "line 2" in str(err.value)


def test_options_have_types_and_ranges():
    assert ModelOptions(capacity_factor_train=2).capacity_factor_train == 2.0
    assert isinstance(ModelOptions(capacity_factor_train=2).capacity_factor_train, float)
    for kwargs, message in [
        ({"moe_group_size": 1.5}, "options.moe_group_size=1.5: expected an integer >= 1"),
        ({"moe_group_size": True}, "options.moe_group_size=True: expected an integer >= 1"),
        ({"scan_layers": "false"}, "options.scan_layers='false': expected true or false"),
        ({"init_std": float("nan")}, "options.init_std=nan: expected a number > 0"),
        ({"capacity_factor_eval": -1}, "options.capacity_factor_eval=-1: expected a number > 0 or null"),
        ({"attention_impl": "flash"}, "options.attention_impl='flash': expected one of"),
    ]:
        with pytest.raises(ConfigError) as err:
            ModelOptions(**kwargs)
        assert str(err.value).startswith(message), str(err.value)


def test_token_ids_of_a_project_config_fit_the_vocabulary():
    with pytest.raises(
        ConfigError, match=r"x.yaml: config field .eos_token_id.=512: expected a token id in \[0, vocab_size=512\)"
    ):
        DeepseekConfig.from_project_dict({"model": {"vocab_size": 512, "eos_token_id": 512}}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"'bos_token_id'=-1"):
        DeepseekConfig.from_project_dict({"model": {"vocab_size": 512, "bos_token_id": -1}})
    # Ids the file does not give keep the reference defaults, as HF does (bos 100000 with a small vocabulary).
    config = DeepseekConfig.from_project_dict({"model": {"vocab_size": 512, "eos_token_id": [2, 3]}})
    assert config.bos_token_id == 100000 and config.eos_token_id == (2, 3)
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        small_config(rms_norm_eps=float("inf"))


def test_differing_fields():
    old = small_config().to_hf(metadata=False)
    new = small_config(hidden_size=128, rope_theta=5e5).to_hf(metadata=False)
    assert differing_fields(old, new) == [
        ("hidden_size", old["hidden_size"], 128),
        ("rope_theta", old["rope_theta"], 500000.0),
    ]
    assert differing_fields(old, dict(old)) == []
    # Keys of either side count, sorted; a missing key reads as None.
    diffs = differing_fields({"b": 1, "a": "x", "n": None}, {"a": "y", "c": 2})
    assert diffs == [("a", "x", "y"), ("b", 1, None), ("c", None, 2)]
    assert format_changes(diffs) == "a: 'x' -> 'y', b: 1 -> None, c: None -> 2"

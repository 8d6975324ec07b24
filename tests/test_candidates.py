import pytest
import transformers
from conftest import tiny_model
from torch import nn

from diffora import ModelError, find_candidates
from diffora.method.candidates import detect_task_heads


@pytest.mark.parametrize(
    "arch, labels",
    [
        ("bert", ["query", "key", "value", "attn.out", "ffn.in", "ffn.out"]),
        ("llama", ["q", "k", "v", "o", "gate", "up", "down"]),
        ("gpt2", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    ],
)
def test_presets_build_full_grid(arch, labels):
    model = tiny_model(arch)
    grid = find_candidates(model)
    assert grid.labels == labels
    assert grid.shape == (2, len(labels))
    assert all(name is not None for row in grid.names for name in row)
    # every grid entry is a real module in the right layer
    for i, row in enumerate(grid.names):
        for name in row:
            assert f".{i}." in name
            model.get_submodule(name)


def test_heads_and_lm_head_are_never_candidates():
    for arch in ("bert", "llama", "gpt2"):
        for kind in ("seq_cls", "causal"):
            if arch == "bert" and kind == "causal":
                continue
            names = find_candidates(tiny_model(arch, kind)).module_names()
            assert not any(n.endswith(("classifier", "score", "lm_head")) for n in names)


def test_bert_param_costs_ffn_larger_than_attention():
    grid = find_candidates(tiny_model("bert"))
    q, ffn_in = grid.param_costs[0][0], grid.param_costs[0][4]
    assert q == 32 + 32 and ffn_in == 32 + 64


def test_vit_and_deberta_presets():
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
            num_labels=3,
        )
    )
    grid = find_candidates(vit)
    assert grid.family.startswith("vit") and grid.shape == (2, 6)
    deberta = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64
        )
    )
    grid = find_candidates(deberta)
    assert grid.family == "deberta-v2" and grid.shape == (2, 6)
    assert set(detect_task_heads(deberta)) == {"pooler", "classifier"}


def test_user_types_by_suffix_and_full_names():
    model = tiny_model("llama")
    grid = find_candidates(model, target_types=["q_proj", "mlp.down_proj"])
    assert grid.types == ["self_attn.q_proj", "mlp.down_proj"]
    full = ["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    grid = find_candidates(model, target_modules=full)
    assert sorted(grid.module_names()) == sorted(full)
    assert grid.names[0][0] is None  # layer 0 has no v_proj candidate


def test_unknown_type_lists_what_exists():
    with pytest.raises(ModelError, match=r"matches no linear layer.*attention\.self\.query"):
        find_candidates(tiny_model("bert"), target_types=["q_proj"])


def test_head_as_full_name_is_refused():
    with pytest.raises(ModelError, match="not inside a repeated transformer block"):
        find_candidates(tiny_model("bert"), target_modules=["classifier"])
    with pytest.raises(ModelError, match="no module has that name"):
        find_candidates(tiny_model("bert"), target_modules=["bert.encoder.layer.0.nope"])


def test_model_without_blocks_is_refused():
    with pytest.raises(ModelError, match="no stack of repeated transformer blocks"):
        find_candidates(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_detected_heads():
    assert detect_task_heads(tiny_model("bert")) == ["classifier"]
    assert detect_task_heads(tiny_model("llama")) == ["score"]
    assert detect_task_heads(tiny_model("llama", "causal")) == []

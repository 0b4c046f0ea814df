"""mamba-ssm's real MambaLMHeadModel on CPU: training step, generation path, meta init, presets, checkpoints."""
import json
import math

import pytest
import torch

from kotomamba.kernels import select_kernel_backend
from kotomamba.model import (
    MODEL_PRESETS,
    CheckpointError,
    ModelConfigError,
    build_model,
    count_parameters,
    load_base_model,
    load_model_config,
    materialize_and_init,
)
from kotomamba.optim import no_weight_decay_parameter_names

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests exercise the CPU reference backend")

VOCAB = 101  # not a multiple of 8, so the model pads it
TINY = {
    "mamba1": {"d_model": 32, "n_layer": 2},
    "mamba2": {"d_model": 32, "n_layer": 2,
               "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}},
    "mamba2_groups_mlp": {"d_model": 64, "n_layer": 2, "d_intermediate": 96,
                          "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2,
                                      "chunk_size": 8}},
    "mamba1_mlp": {"d_model": 32, "n_layer": 2, "d_intermediate": 64},
    "hybrid_attention": {"d_model": 32, "n_layer": 3, "attn_layer_idx": [1],
                         "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "causal": True}},
}


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    select_kernel_backend("cpu")


def tiny_config(name: str):
    preset = "mamba2-130m" if "mamba2" in name else "130m"
    return load_model_config(preset, VOCAB, TINY[name])


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_reaches_every_parameter(name):
    model = build_model(tiny_config(name), seed=0)
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = model(ids).logits
    padded_vocab = 112 if "mamba2" in name else 104  # Mamba-2 presets pad to multiples of 16, Mamba-1 of 8
    assert logits.shape == (2, 12, padded_vocab)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", TINY)
def test_recurrent_generation_path_equals_full_forward(name):
    from mamba_ssm.utils.generation import InferenceParams

    model = build_model(tiny_config(name), seed=1).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    prompt_len = 4
    with torch.no_grad():
        full = model(ids).logits
        params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=2)
        params.key_value_memory_dict = model.allocate_inference_cache(2, ids.shape[1])
        stepped = [model(ids[:, :prompt_len], inference_params=params).logits]
        params.seqlen_offset += prompt_len
        for position in range(prompt_len, ids.shape[1]):
            stepped.append(model(ids[:, position:position + 1], inference_params=params).logits)
            params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_meta_init_is_bitwise_equal_to_mamba_ssm_init(name):
    config = tiny_config(name)
    expected = build_model(config, seed=7)
    model = materialize_and_init(build_model(config, on_meta=True), "cpu", seed=7)
    actual_parameters = dict(model.named_parameters())
    assert actual_parameters.keys() == dict(expected.named_parameters()).keys()
    for parameter_name, parameter in expected.named_parameters():
        assert torch.equal(actual_parameters[parameter_name], parameter), parameter_name
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.backbone.layers[0].mixer.A_log._no_weight_decay
    torch.testing.assert_close(model(torch.arange(10).view(1, 10)).logits,
                               expected(torch.arange(10).view(1, 10)).logits, rtol=0, atol=0)


def test_meta_init_needs_a_meta_model():
    with pytest.raises(ValueError, match="on_meta=True"):
        materialize_and_init(build_model(tiny_config("mamba1")), "cpu", seed=0)


def _mamba1_parameter_count(d_model, n_layer, vocab, d_state=16, expand=2, d_conv=4):
    inner, rank = expand * d_model, math.ceil(d_model / 16)
    layer = (d_model * 2 * inner + inner * d_conv + inner + inner * (rank + 2 * d_state) + rank * inner + inner
             + inner * d_state + inner + inner * d_model + d_model)
    return vocab * d_model + n_layer * layer + d_model


def _mamba2_parameter_count(d_model, n_layer, vocab, d_state=128, headdim=64, expand=2, d_conv=4):
    inner = expand * d_model
    heads, conv_dim = inner // headdim, inner + 2 * d_state
    layer = (d_model * (2 * inner + 2 * d_state + heads) + conv_dim * (d_conv + 1) + 3 * heads + inner
             + inner * d_model + d_model)
    return vocab * d_model + n_layer * layer + d_model


# mamba-130m and mamba-2.8b: the sizes published on their model cards (129M, 2.77B), to 0.5 %.
# The other presets: the size in their name, to 5 % (mamba2-1.3b really has 1.34B).
@pytest.mark.parametrize("preset,published,tolerance", [
    ("130m", 129e6, 0.005), ("2.8b", 2.77e9, 0.005),
    ("370m", 370e6, 0.05), ("790m", 790e6, 0.05), ("1.4b", 1.4e9, 0.05),
    ("mamba2-130m", 130e6, 0.05), ("mamba2-370m", 370e6, 0.05), ("mamba2-780m", 780e6, 0.05),
    ("mamba2-1.3b", 1.3e9, 0.05), ("mamba2-2.7b", 2.7e9, 0.05),
])
def test_preset_parameter_counts(preset, published, tolerance):
    model = build_model(load_model_config(preset, 50277), on_meta=True)
    count = count_parameters(model)
    shape = MODEL_PRESETS[preset]
    if preset.startswith("mamba2"):
        assert model.backbone.embedding.num_embeddings == 50288
        assert count == _mamba2_parameter_count(shape["d_model"], shape["n_layer"], 50288)
    else:
        assert model.backbone.embedding.num_embeddings == 50280
        assert count == _mamba1_parameter_count(shape["d_model"], shape["n_layer"], 50280)
    assert abs(count - published) / published < tolerance, count


def test_no_weight_decay_names():
    model = build_model(tiny_config("mamba2_groups_mlp"))
    names = no_weight_decay_parameter_names(model)
    for layer in range(2):
        for leaf in ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.conv1d.bias", "mixer.norm.weight",
                     "norm.weight", "norm2.weight"):
            assert f"backbone.layers.{layer}.{leaf}" in names
        assert f"backbone.layers.{layer}.mixer.in_proj.weight" not in names
    assert "backbone.norm_f.weight" in names
    assert "backbone.embedding.weight" not in names and "lm_head.weight" not in names
    assert names <= {name for name, _ in model.named_parameters()}


def test_config_from_file_and_directory_with_overrides(tmp_path):
    values = dict(MODEL_PRESETS["mamba2-130m"], vocab_size=50277)
    (tmp_path / "config.json").write_text(json.dumps(values))
    from_dir = load_model_config(str(tmp_path), 32000, {"n_layer": 3, "ssm_cfg": {"d_state": 64}})
    assert from_dir.vocab_size == 32000 and from_dir.n_layer == 3
    assert from_dir.ssm_cfg == {**MODEL_PRESETS["mamba2-130m"]["ssm_cfg"], "d_state": 64}
    assert load_model_config(str(tmp_path / "config.json"), 32000).d_model == 768
    assert load_model_config("130m", 32000).ssm_cfg["layer"] == "Mamba1"
    assert MODEL_PRESETS["mamba2-130m"]["ssm_cfg"]["d_state"] == 128  # overrides must not leak into presets


def test_config_errors_name_the_culprit(tmp_path):
    with pytest.raises(ModelConfigError, match="'mamba-9000'"):
        load_model_config("mamba-9000", 100)
    broken = tmp_path / "broken.json"
    broken.write_text('{"d_model": 64,\n "n_layer": }')
    with pytest.raises(ModelConfigError, match=r"broken\.json:2:"):
        load_model_config(str(broken), 100)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"d_model": 64, "n_layers": 2}))
    with pytest.raises(ModelConfigError, match=r"unknown\.json: unknown MambaConfig key\(s\) \['n_layers'\]"):
        load_model_config(str(unknown), 100)
    with pytest.raises(ModelConfigError, match="no model config at"):
        load_model_config(str(tmp_path), 100)
    with pytest.raises(ModelConfigError, match="unknown MambaConfig key"):
        load_model_config("130m", 100, {"dmodel": 5})
    with pytest.raises(ModelConfigError, match="'Mamba3'"):
        load_model_config("130m", 100, {"ssm_cfg": {"layer": "Mamba3"}})
    with pytest.raises(ModelConfigError, match="n_layer must be a positive integer"):
        load_model_config("130m", 100, {"n_layer": 0})
    with pytest.raises(ModelConfigError, match="vocab_size"):
        load_model_config("130m", -1)


def _saved_base_model(tmp_path, name="mamba1"):
    model = build_model(tiny_config(name), seed=11)
    model.save_pretrained(str(tmp_path))
    return model


def test_load_base_model_from_pytorch_bin(tmp_path):
    saved = _saved_base_model(tmp_path)
    loaded = load_base_model(str(tmp_path), vocab_size=104)
    for name, parameter in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], parameter), name
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert loaded.backbone.layers[0].mixer.dt_proj.bias._no_reinit


def test_load_base_model_from_safetensors_without_tied_head(tmp_path):
    from safetensors.torch import save_file

    saved = _saved_base_model(tmp_path, "mamba2")
    (tmp_path / "pytorch_model.bin").unlink()
    tensors = {name: tensor for name, tensor in saved.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = load_base_model(str(tmp_path), vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, saved(ids).logits, rtol=0, atol=0)


def test_load_base_model_errors(tmp_path):
    _saved_base_model(tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer has 105 tokens but .* only 104 embedding rows"):
        load_base_model(str(tmp_path), vocab_size=105)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights .*pytorch_model.bin"):
        load_base_model(str(tmp_path), vocab_size=VOCAB)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_base_model(str(tmp_path), vocab_size=VOCAB)
    other = build_model(tiny_config("mamba1_mlp"))
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights do not match the config"):
        load_base_model(str(tmp_path), vocab_size=VOCAB)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base_model(str(tmp_path / "missing"), vocab_size=VOCAB)

"""`python -m kotomamba.convert`: training checkpoints to mamba-ssm (from_pretrained, --base-model) and to
Hugging Face transformers (AutoModelForCausalLM, logits equal to ours on CPU in fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kotomamba.model_loading import load_model_from_checkpoint
from kotomamba.convert import ExportError, export, hf_config, main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_MAMBA1, TINY_MAMBA2, write_model_config  # noqa: E402
from training_worker import run_configurations  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU conversion tests")


@pytest.fixture(scope="module")
def checkpoints(single_process, tmp_path_factory, tokenized_corpus, sentencepiece_model,
                hf_tokenizer_dir) -> dict[str, Path]:
    """One-iteration training runs: Mamba-1 with a Hugging Face tokenizer (sharded), Mamba-2 with
    SentencePiece (one consolidated file), and Mamba-1 with MLP blocks (not expressible in transformers)."""
    directory = tmp_path_factory.mktemp("convert")
    models = {"mamba1": TINY_MAMBA1, "mamba2": TINY_MAMBA2, "mlp": {**TINY_MAMBA1, "d_intermediate": 16}}
    tokenizers = {"mamba1": ["HuggingFaceTokenizer", hf_tokenizer_dir]}
    common = ["--data-path", str(tokenized_corpus), "--split", "100,0,0", "--seq-length", "16",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-2",
              "--eval-iters", "0", "--num-workers", "0", "--fp32"]
    runs = {}
    for name, values in models.items():
        tokenizer_type, tokenizer_model = tokenizers.get(name, ["SentencePieceTokenizer", sentencepiece_model])
        runs[name] = common + [
            "--model", str(write_model_config(directory / f"{name}.json", values)),
            "--tokenizer-type", tokenizer_type, "--tokenizer-model", str(tokenizer_model),
            "--save", str(directory / name),
            "--checkpoint-type", "FULL_STATE_DICT" if name == "mamba2" else "SHARDED_STATE_DICT",
        ]
    results = run_configurations(runs, single_process)
    assert all("error" not in result for result in results.values()), results
    return {name: directory / name for name in models}


def sample_tokens() -> torch.Tensor:
    return torch.randint(0, 400, (2, 37), generator=torch.Generator().manual_seed(0))


def test_mamba_ssm_export_loads_with_from_pretrained_and_as_base_model(single_process, checkpoints, tokenized_corpus,
                                                                       hf_tokenizer_dir, tmp_path):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    output = tmp_path / "mamba1-ssm"
    # A separate process: loading a checkpoint needs no process group.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run([sys.executable, "-m", "kotomamba.convert", str(checkpoints["mamba1"]), str(output),
                                "--format", "mamba-ssm"], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert {"config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in output.iterdir()}

    ours, _ = load_model_from_checkpoint(str(checkpoints["mamba1"]), torch.device("cpu"))
    theirs = MambaLMHeadModel.from_pretrained(str(output))  # a local directory: no hub access
    with torch.no_grad():
        assert torch.equal(theirs(sample_tokens()).logits, ours(sample_tokens()).logits)

    # Continual pretraining from the export starts from exactly these weights.
    argv = ["--base-model", str(output), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
            str(hf_tokenizer_dir), "--data-path", str(tokenized_corpus), "--split", "100,0,0", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "0",
            "--eval-iters", "0", "--num-workers", "0", "--fp32", "--save", str(tmp_path / "continued")]
    result = run_configurations({"continued": argv}, single_process)["continued"]
    assert result["iteration"] == [1], result
    continued, _ = load_model_from_checkpoint(str(tmp_path / "continued"), torch.device("cpu"))
    for (name, a), b in zip(ours.state_dict().items(), continued.state_dict().values()):
        assert torch.equal(a, b), name  # lr 0: the first step changes nothing


@pytest.mark.parametrize("name, architecture", [("mamba1", "MambaForCausalLM"), ("mamba2", "Mamba2ForCausalLM")])
def test_hugging_face_export_has_our_logits(name, architecture, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = export(str(checkpoints[name]), str(tmp_path / name), "hf")
    assert json.loads((output / "config.json").read_text())["architectures"] == [architecture]
    assert (output / "model.safetensors").is_file()
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044, modes  # as readable as its siblings
    hf_model = AutoModelForCausalLM.from_pretrained(str(output))
    assert type(hf_model).__name__ == architecture
    ours, info = load_model_from_checkpoint(str(checkpoints[name]), torch.device("cpu"))
    with torch.no_grad():
        expected, actual = ours(sample_tokens()).logits, hf_model(sample_tokens()).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    if info["tokenizer_type"] == "HuggingFaceTokenizer":
        from megatron_lm.tokenizer import build_tokenizer

        text = "Mamba は状態空間モデルです。"
        ids = build_tokenizer("HuggingFaceTokenizer", info["tokenizer_model"]).encode(text)
        assert AutoTokenizer.from_pretrained(str(output))(text)["input_ids"] == ids


def test_configurations_transformers_cannot_express_are_refused(checkpoints, tmp_path, capsys):
    output = tmp_path / "mlp-hf"
    assert main([str(checkpoints["mlp"]), str(output), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "MLP blocks (d_intermediate 16)" in err and "--format mamba-ssm" in err
    assert not output.exists()
    assert main([str(checkpoints["mlp"]), str(output), "--format", "mamba-ssm"]) == 0  # the way out

    from mamba_ssm.models.config_mamba import MambaConfig

    hybrid = MambaConfig(d_model=32, n_layer=2, vocab_size=100, attn_layer_idx=[1], attn_cfg={"num_heads": 2})
    with pytest.raises(ExportError, match=r"attention layers at \[1\]"):
        hf_config(hybrid)
    layer_norm = MambaConfig(d_model=32, n_layer=2, vocab_size=100, rms_norm=False)
    with pytest.raises(ExportError, match="LayerNorm"):
        hf_config(layer_norm)
    mamba2 = MambaConfig(d_model=32, n_layer=2, vocab_size=100,
                         ssm_cfg={"layer": "Mamba2", "headdim": 16, "norm_before_gate": True})
    with pytest.raises(ExportError, match="norm_before_gate"):
        hf_config(mamba2)


def test_an_existing_output_is_never_overwritten(checkpoints, tmp_path, capsys):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main([str(checkpoints["mamba2"]), str(output), "--format", "mamba-ssm"]) == 2
    assert f"{output} already exists" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out"), "--format", "hf"]) == 2
    assert "holds no kotomamba checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Hugging Face models in: converted to mamba-ssm's format, and used directly as --base-model


def tiny_hf_model(model_type: str, directory: Path, hf_tokenizer_dir: Path, **overrides):
    """A random transformers Mamba / Mamba-2 saved with save_pretrained, with a tokenizer next to it."""
    import shutil

    import transformers

    torch.manual_seed(0)
    if model_type == "mamba":
        config = transformers.MambaConfig(vocab_size=510, hidden_size=32, num_hidden_layers=2, state_size=8,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=3, **overrides)
        model = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(vocab_size=510, hidden_size=32, num_hidden_layers=2, state_size=16,
                                           num_heads=4, head_dim=16, n_groups=2, chunk_size=8, bos_token_id=1,
                                           eos_token_id=2, pad_token_id=3, **overrides)
        model = transformers.Mamba2ForCausalLM(config)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_tokenizer_dir / name, directory / name)
    return model.eval()


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
def test_hugging_face_model_round_trips_through_the_mamba_ssm_format(model_type, hf_tokenizer_dir, tmp_path):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from transformers import AutoModelForCausalLM

    original = tiny_hf_model(model_type, tmp_path / "hf", hf_tokenizer_dir)
    assert main([str(tmp_path / "hf"), str(tmp_path / "ours"), "--format", "mamba-ssm"]) == 0
    ours_dir = tmp_path / "ours"
    assert {"config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in ours_dir.iterdir()}
    torch.load(ours_dir / "pytorch_model.bin", weights_only=True)  # plain tensors: no unpickling needed
    ours = MambaLMHeadModel.from_pretrained(str(ours_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(sample_tokens()).logits, original(sample_tokens()).logits,
                                   rtol=1e-4, atol=1e-5)

    back = export(str(ours_dir), str(tmp_path / "back"), "hf")
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in back.iterdir()}
    returned = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    assert returned.config.eos_token_id == 2 and returned.config.pad_token_id == 3
    expected = original.state_dict()
    assert returned.state_dict().keys() == expected.keys()
    for name, tensor in returned.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with torch.no_grad():
        assert torch.equal(returned(sample_tokens()).logits, original(sample_tokens()).logits)


def test_base_model_may_be_a_hugging_face_directory(single_process, hf_tokenizer_dir, tokenized_corpus, tmp_path):
    from kotomamba.model import CheckpointError, load_base_model

    original = tiny_hf_model("mamba2", tmp_path / "hf", hf_tokenizer_dir)
    argv = ["--base-model", str(tmp_path / "hf"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
            str(hf_tokenizer_dir), "--data-path", str(tokenized_corpus), "--split", "100,0,0", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "0",
            "--eval-iters", "0", "--num-workers", "0", "--fp32", "--save", str(tmp_path / "continued")]
    result = run_configurations({"continued": argv}, single_process)["continued"]
    assert result["iteration"] == [1, 2], result
    continued, _ = load_model_from_checkpoint(str(tmp_path / "continued"), torch.device("cpu"))
    with torch.no_grad():  # lr 0: training kept exactly the Hugging Face weights
        torch.testing.assert_close(continued(sample_tokens()).logits, original(sample_tokens()).logits,
                                   rtol=1e-4, atol=1e-5)

    # A norm epsilon mamba-ssm's config cannot hold would be lost in checkpoints: refused, naming the file.
    tiny_hf_model("mamba", tmp_path / "eps", hf_tokenizer_dir, layer_norm_epsilon=0.1)
    with pytest.raises(CheckpointError, match=r"eps/config.json: layer_norm_epsilon 0.1 cannot be expressed"):
        load_base_model(str(tmp_path / "eps"))


def test_from_scratch_takes_a_hugging_face_directory_architecture(hf_tokenizer_dir, tmp_path):
    from kotomamba.model import load_model_config

    tiny_hf_model("mamba2", tmp_path / "hf", hf_tokenizer_dir)
    config = load_model_config(str(tmp_path / "hf"), 502)  # what --base-model DIR --from-scratch builds
    assert (config.d_model, config.n_layer, config.vocab_size) == (32, 2, 502)
    assert config.ssm_cfg["layer"] == "Mamba2" and config.ssm_cfg["headdim"] == 16

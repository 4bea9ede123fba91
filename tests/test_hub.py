"""Sharing: the model card and the upload plan, tested without the network (HfApi is mocked)."""
from __future__ import annotations

import json
from unittest import mock

import pytest

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



@pytest.fixture(scope="module")
def qdir(tiny_text_file, tiny_llama_dir, tmp_path_factory):
    import gptqkit
    out = tmp_path_factory.mktemp("hub") / "tiny-gptq-4bit"
    gptqkit.quantize(tiny_llama_dir, [_one_text(tiny_text_file)] * 4, out, gptqkit.QuantizeConfig(bits=4, group_size=32),
                     nsamples=4, seqlen=64, progress=False)
    return out


def test_model_card_content(qdir):
    from gptqkit.hub import model_card
    card = model_card(qdir, "me/tiny-gptq", base_model="org/tiny-base")
    assert card.startswith("---\n") and "base_model: org/tiny-base" in card and "- gptq" in card
    for needle in ("| bits | `4` |", "| group_size | `32` |", "| desc_act | `true` |",
                   "4 sequences of 64 tokens", 'gptqkit.load("me/tiny-gptq")',
                   'AutoModelForCausalLM.from_pretrained("me/tiny-gptq"', "vllm serve me/tiny-gptq --quantization gptq",
                   "Perplexity was not measured"):
        assert needle in card, needle


def test_push_to_hub_with_mock_api(qdir, tmp_path):
    import shutil

    from gptqkit.hub import push_to_hub, upload_plan
    d = tmp_path / "ckpt"
    shutil.copytree(qdir, d)
    (d / "eval.json").write_text(json.dumps({"text": "shakespeare-eval", "seqlen": 512,
                                             "ppl_before": {"perplexity": 20.0}, "ppl_after": {"perplexity": 21.5}}))
    (d / "notes.tmp").write_text("not part of a checkpoint")
    api = mock.MagicMock()
    push_to_hub(d, "me/tiny-gptq", private=True, api=api)
    api.create_repo.assert_called_once_with(repo_id="me/tiny-gptq", repo_type="model", private=True, exist_ok=True)
    kw = api.upload_folder.call_args.kwargs
    assert kw["repo_id"] == "me/tiny-gptq" and kw["folder_path"] == str(d)
    assert kw["allow_patterns"] == upload_plan(d)
    assert set(kw["allow_patterns"]) == {"README.md", "config.json", "eval.json", "generation_config.json",
                                         "model.safetensors", "quant_log.csv", "quant_log.json",
                                         "quantize_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert "4-bit GPTQ" in kw["commit_message"]
    card = (d / "README.md").read_text()
    assert "| original | 20.000 |" in card and "| this checkpoint | 21.500 |" in card


def test_push_refuses_non_checkpoint(tiny_llama_dir):
    from gptqkit.errors import CheckpointError
    from gptqkit.hub import push_to_hub
    with pytest.raises(CheckpointError):
        push_to_hub(tiny_llama_dir, "me/x", api=mock.MagicMock())


def test_cli_quantize_push_to_hub(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    from gptqkit.cli import main
    out = tmp_path / "q"
    with mock.patch("huggingface_hub.HfApi") as HfApi:
        rc = main(["quantize", str(tiny_llama_dir), "--calib", str(tiny_text_file), "--nsamples", "4",
                   "--seqlen", "32", "--group-size", "32", "--out", str(out), "--eval-text", str(tiny_text_file),
                   "--eval-seqlen", "32", "--max-windows", "2", "--push-to-hub", "me/tiny-cli", "--json"])
    assert rc == 0
    api = HfApi.return_value
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/tiny-cli"
    assert "README.md" in api.upload_folder.call_args.kwargs["allow_patterns"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["ppl_after"]["perplexity"] > 0
    card = (out / "README.md").read_text()
    assert "| this checkpoint |" in card and "base_model:" not in card  # local source: no hub base model
    res = json.loads(capsys.readouterr().out)
    assert "pushed" in res

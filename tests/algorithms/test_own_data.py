"""Issue #21, the user's own data: ``data.fields`` maps other field names, ``hf:`` reads a
Hugging Face dataset (a local ``save_to_disk`` folder here: no network), and both are
checked when the config is validated, before a model is loaded."""

import re

import datasets as hf_datasets
import pytest
from cfg_helpers import load_config

from jaxalign import train
from jaxalign.algorithms import policy_run, sft
from jaxalign.config import ConfigError
from jaxalign.data import datasets
from jaxalign.data.datasets import DataError, FieldMap, parse_field_map

ROWS = [
    {"prompt_text": "What is 2 + 3?", "target": "5", "uid": "a"},
    {"prompt_text": "What is 4 * 5?", "target": "20", "uid": "b"},
    {"prompt_text": "Solve x + 1 = 3.", "target": "The answer is \\boxed{2}.", "uid": "c"},
]


@pytest.fixture
def hub_dir(tmp_path):
    """A dataset as ``DatasetDict.save_to_disk`` writes it (what a user caches offline)."""
    path = tmp_path / "my_math"
    hf_datasets.DatasetDict({
        "train": hf_datasets.Dataset.from_list(ROWS),
        "test": hf_datasets.Dataset.from_list(ROWS[:1]),
    }).save_to_disk(str(path))
    return path


def test_field_maps_parse_and_bad_ones_say_the_grammar():
    assert parse_field_map("") is None and parse_field_map("  ") is None
    assert parse_field_map("question=prompt_text, answer=target ,id=uid") == FieldMap(
        "prompt_text", "target", id="uid")
    boxed = parse_field_map("question=q,answer=sol,solution=sol,parse=boxed")
    assert boxed.parse_answer is datasets.extract_boxed and boxed.solution == "sol"
    assert parse_field_map("question=q") == FieldMap("q", "answer")  # unnamed: the defaults
    for bad, why in [("question=q,answer=a,parse=latex", "parse='latex'; choose none, gsm8k"),
                     ("question=q,answer=a,prompt=p", "expected question=F,answer=F"),
                     ("question=q,question=r,answer=a", "given twice"), ("question", "expected")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_field_map(bad)


def test_hub_dataset_with_mapped_fields_loads_every_split(hub_dir):
    fields = parse_field_map("question=prompt_text,answer=target,id=uid")
    train_rows, used = datasets.load_problem_source(f"hf:{hub_dir}", fields=fields)
    assert used is fields and [e.id for e in train_rows] == ["a", "b", "c"]
    assert train_rows[0].question == "What is 2 + 3?" and train_rows[0].answer == "5"
    assert train_rows[2].source == f"hf:{hub_dir}[train] row 2"
    test_rows, _ = datasets.load_problem_source(f"hf:{hub_dir}", fields=fields, split="test")
    assert len(test_rows) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        datasets.load_problem_source(f"hf:{hub_dir}", fields=fields, split="validation")
    # Without a map the MATH/GSM8K shape is looked for, and the first row says it is absent.
    with pytest.raises(DataError, match=r"row 0: no question field: need 'problem' or 'question'"):
        datasets.load_problem_source(f"hf:{hub_dir}")


def test_a_missing_hub_dataset_is_one_line_not_a_trace(tmp_path):
    with pytest.raises(DataError, match="cannot load the Hugging Face dataset"):
        datasets.load_problem_source(f"hf:{tmp_path / 'nowhere'}")


def _grpo(source, fields=""):
    cfg = load_config("grpo")
    cfg.data.source, cfg.data.fields = source, fields
    cfg.warmstart.sft_steps = 0  # the warm start trains on generated traces only
    return cfg


def test_grpo_trains_on_a_hub_dataset_with_its_own_field_names(hub_dir, tmp_path):
    cfg = _grpo(f"hf:{hub_dir}", "question=prompt_text,answer=target,parse=none")
    train.validate(cfg)
    questions, held_out = policy_run.load_questions(cfg.data)
    assert [q.answer for q in questions] == ["5", "20", "The answer is \\boxed{2}."]
    assert held_out == []
    boxed = _grpo(f"hf:{hub_dir}", "question=prompt_text,answer=target,parse=boxed")
    with pytest.raises(ConfigError, match=r"row 0: no answer in field 'target'"):
        train.validate(boxed)  # "5" has no \boxed{}: found at config time


def test_field_mistakes_are_config_errors_before_any_model_loads(hub_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data.source=.*row 0: no question field.*map them "
                                          r"with config.data.fields=question=F,answer=F"):
        train.validate(_grpo(f"hf:{hub_dir}"))
    with pytest.raises(ConfigError, match=r"config.data.fields 'question=prompt_text,ans': "
                                          r"expected question=F,answer=F"):
        train.validate(_grpo(f"hf:{hub_dir}", "question=prompt_text,ans"))
    with pytest.raises(ConfigError, match=r"row 0: missing field 'answer'"):
        train.validate(_grpo(f"hf:{hub_dir}", "question=prompt_text,answer=answer"))
    with pytest.raises(ConfigError, match=r"data.fields=.*maps the fields of a JSONL or hf: "):
        train.validate(_grpo("synthetic", "question=q,answer=a"))


def test_sft_reads_a_hub_dataset_with_mapped_fields(tmp_path, shared_data):
    path = tmp_path / "traces"
    hf_datasets.Dataset.from_list([
        {"input": "Q: 1+1?", "output": " 2 </answer>"},
        {"input": "Q: 2+2?", "output": " 4 </answer>"},
    ]).save_to_disk(str(path))
    cfg = load_config("sft")
    cfg.data.data_dir = str(shared_data)
    cfg.data.source, cfg.data.fields = f"hf:{path}", "prompt=input,response=output"
    train.validate(cfg)
    pairs, held_out = sft.load_pairs(cfg.data)
    assert pairs == [("Q: 1+1?", " 2 </answer>"), ("Q: 2+2?", " 4 </answer>")] and not held_out
    cfg.data.fields = ""
    with pytest.raises(ConfigError, match=r"row 0: missing field 'prompt'.*prompt=F,response=F"):
        train.validate(cfg)
    cfg.data.fields = "prompt=input,answer=output"
    with pytest.raises(ConfigError, match=r"expected prompt=F,response=F"):
        train.validate(cfg)


def test_sft_validates_on_several_sets(tmp_path, shared_data):
    """``eval.sets`` in SFT: each set logged as ``eval/<name>/*`` with the held-out set."""
    import json

    from cfg_helpers import shrink

    from jaxalign.data.synthetic import DEMO_TEMPLATE
    from jaxalign.logging import read_metrics

    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    (tmp_path / "plus_one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = shrink(load_config("sft"), tmp_path)
    cfg.data.source, cfg.data.template = "synthetic", DEMO_TEMPLATE
    cfg.data.num_train, cfg.data.num_eval = 64, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = 2, 8, (96,)
    cfg.eval.every, cfg.eval.num_examples, cfg.eval.max_tokens = 0, 2, 8
    cfg.eval.num_workers, cfg.eval.at_start = 0, True
    cfg.eval.sets = f"{tmp_path / 'plus_one.jsonl'}:2"
    summary = train.run(cfg)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "eval/answer_reward" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all("eval/plus_one/answer_reward" in r for r in evals)
    assert set(summary["eval_after_sets"]) == {"plus_one"}
    cfg.eval.sets = "no_such_benchmark"
    with pytest.raises(ConfigError, match="config.eval.sets="):
        train.validate(cfg)

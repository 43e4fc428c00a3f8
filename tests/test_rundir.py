"""The run-directory rules: which config changes a resume refuses, and log truncation."""

import json

from jaxalign import rundir


def _cfg(**over):
    cfg = {"algorithm": "sft", "seed": 0, "workdir": "runs/a",
           "model": {"preset": "tiny", "arch": {}, "dtype": "float32", "param_dtype": "float32"},
           "data": {"source": "gsm8k", "data_dir": "../shared/data", "num_eval": 8},
           "train": {"steps": 10, "batch_size": 8, "seq_buckets": (64, 128)},
           "optim": {"lr": 1e-3, "grad_accum_steps": 1}}
    for key, value in over.items():
        block, _, field = key.partition("__")
        if field:
            cfg[block] = dict(cfg[block], **{field: value})
        else:
            cfg[key] = value
    return cfg


def test_fixed_fields_conflict_and_free_fields_do_not():
    old = _cfg()
    # tuples (the live config) and lists (config.json) are the same value
    assert rundir.config_changes(old, json.loads(json.dumps(old))) == {}
    free = _cfg(train__steps=20, optim__lr=3e-4, model__dtype="bfloat16",
                data__data_dir="/elsewhere", data__num_eval=64, workdir="runs/b")
    assert rundir.resume_conflicts(old, free) == {}
    assert set(rundir.config_changes(old, free)) == {
        "train.steps", "optim.lr", "model.dtype", "data.data_dir", "data.num_eval", "workdir"}
    fixed = _cfg(model__preset="small", train__batch_size=16, seed=1, data__source="math",
                 optim__grad_accum_steps=2, model__arch={"num_hidden_layers": 4})
    assert set(rundir.resume_conflicts(old, fixed)) == {
        "model.preset", "train.batch_size", "seed", "data.source", "optim.grad_accum_steps",
        "model.arch.num_hidden_layers"}


def test_fields_added_by_an_upgrade_do_not_block_a_resume(tmp_path):
    """A run started before jaxalign grew ``data.fields`` (or a whole new block) resumes;
    changing a field the run does have is still refused, and the new values are recorded."""
    old = _cfg()
    upgraded = _cfg(data__fields="", data__split="train", lora={"rank": 0})
    assert rundir.resume_conflicts(old, upgraded) == {}
    assert set(rundir.resume_conflicts(old, dict(upgraded, seed=3))) == {"seed"}
    # set on the command line, a new field is a change like any other
    assert set(rundir.resume_conflicts(old, upgraded, overridden=("data.fields",))) == {
        "data.fields"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert rundir.check_resume(tmp_path, upgraded) is None
    assert "config.data.split: None in the run, 'train' now" in rundir.check_resume(
        tmp_path, upgraded, ("data.split",))
    rundir.record_resume(tmp_path, upgraded, step=5)
    record = json.loads((tmp_path / rundir.RESUMES_FILE).read_text())
    assert record["changed"]["data.fields"] == [None, ""]


def test_check_resume_names_each_conflict(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    assert rundir.check_resume(tmp_path, _cfg(train__steps=99)) is None
    message = rundir.check_resume(tmp_path, _cfg(model__preset="small", train__batch_size=4))
    assert "config.model.preset: 'tiny' in the run, 'small' now" in message
    assert "config.train.batch_size: 8 in the run, 4 now" in message
    assert "Nothing in the run directory was changed" in message


def test_record_resume_appends_the_changes_and_step(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    rundir.record_resume(tmp_path, _cfg(train__steps=20), step=10)
    rundir.record_resume(tmp_path, _cfg(train__steps=30), step=20)
    records = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["changed"] == {"train.steps": [10, 30]}
    assert records[1]["config"]["train"]["steps"] == 30


def test_truncate_log_drops_steps_past_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": s}) for s in (0, 1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "x"')  # a kill mid-write
    assert rundir.truncate_log(path, 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert rundir.truncate_log(path, 2) == 0  # nothing to drop: the file is left alone
    assert rundir.truncate_log(path, -1) == 3 and path.read_text() == ""
    assert rundir.truncate_log(tmp_path / "absent.jsonl", 0) == 0

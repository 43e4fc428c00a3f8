"""One process of a multi-process test run (``tests/test_multiprocess.py`` starts them).

    python tests/multiprocess_worker.py WRITES.json -- --config configs/sft.py ...

Runs ``python -m jaxalign.train`` with the arguments after ``--`` (the coordinator, the
process count and id come from the environment, as ``launch/gpu_nodes.sh`` sets them),
and around it:

* records every path this process opened for writing (a ``sys.addaudithook`` hook sees
  each Python-level ``open``) into ``WRITES.json`` when it exits, so the test can check that
  only process 0 wrote the run's logs, plots and exports;

The GRPO test scores with ``--config.data.reward=my_rewards:even_e`` (``tests/verify`` on
``PYTHONPATH``), a reward a random tiny model earns about half the time, as a user names
their own: with the real verifier every reward is 0 and the GRPO loss trivially 0.
"""

import atexit
import json
import os
import runpy
import sys


def _record_writes(out_path: str) -> None:
    writes: list[str] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event != "open" or not args or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path, mode, flags = (list(args) + [None, None])[:3]
        writing = (
            any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0)
                                                                              & write_flags)
        )
        if writing:
            writes.append(os.path.abspath(os.fsdecode(path)))

    sys.addaudithook(hook)

    def dump():
        seen = sorted(set(writes))
        with open(out_path, "w") as f:
            json.dump(seen, f)

    atexit.register(dump)


def main() -> None:
    argv = sys.argv[1:]
    sep = argv.index("--")
    _record_writes(argv[0])
    sys.argv = ["jaxalign.train", *argv[sep + 1 :]]
    runpy.run_module("jaxalign.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

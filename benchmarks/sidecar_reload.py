"""Time to push new weights through the rollout sidecar: export + checksum + reload.

    python benchmarks/sidecar_reload.py                          # ~100M params, fp32 export
    python benchmarks/sidecar_reload.py --export-dtype bfloat16  # half the bytes (vLLM's)
    python benchmarks/sidecar_reload.py --size 21m               # or 400m: time vs size

Starts ``python -m jaxalign.rollout.server --backend jax`` on a random ~100M-parameter
Qwen2 (hidden 768, 12 layers, 12 / 4 heads, MLP 2048, vocab 32768, tied embeddings), then
``--iters`` times builds a fresh random model (not timed) and calls
``SidecarEngine.update_weights(model)``, which

* export: writes it with ``save_pretrained`` to a versioned directory under ``/dev/shm``;
* checksum: sha256 of the safetensors files (``checkpoint_checksum``), trainer side;
* reload: the ``/update_weights`` round trip: the sidecar re-hashes and verifies the
  files, loads them (``from_pretrained``) and swaps the new parameters in.

Prints each iteration and the medians, in seconds. The first iteration includes one-time
costs (imports, first device transfers) and is left out of the medians.

Every phase allocates and fills buffers of the model's size, so the machine's cost of
first-touching memory is part of each number. The last line measures it: filling a fresh
buffer of the export's size right after another (warm) and after 5 s idle (on a VM that
returns idle memory to its host, the second is several times slower).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import init_model, save_pretrained
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.rollout.client import SidecarEngine
from jaxalign.rollout.server import LISTENING

# Random Qwen2 shapes by size; "100m" is the default (hidden 768, 12 layers, vocab 32768).
_BASE = dict(max_position_embeddings=2048, tie_word_embeddings=True)
SIZES = {
    "21m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2, **_BASE),
    "100m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, **_BASE),
    "400m": dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4, **_BASE),
}


def fill_seconds(nbytes: int, idle_s: float = 0.0) -> float:
    """Seconds to allocate and fill a fresh ``nbytes`` buffer after ``idle_s`` of sleep."""
    time.sleep(idle_s)
    t = time.perf_counter()
    buf = np.ones(nbytes // 4, np.float32)
    seconds = time.perf_counter() - t
    del buf
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--size", default="100m", choices=sorted(SIZES))
    args = ap.parse_args()

    cfg = Qwen2Config(**SIZES[args.size])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "start"
        save_pretrained(init_model(cfg, seed=0), model_dir, tokenizer=byte_tokenizer())
        cmd = [sys.executable, "-m", "jaxalign.rollout.server", "--backend", "jax"]
        cmd += ["--model", str(model_dir), "--port", "0"]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            if not line.startswith(LISTENING):
                raise SystemExit(f"the sidecar did not start: {line!r}")
            url = line[len(LISTENING) :].strip()
            client = SidecarEngine(url, export_dtype=args.export_dtype)
            print(
                f"model: {cfg.num_params() / 1e6:.1f}M parameters, export dtype "
                f"{args.export_dtype}, sidecar {url} (jax backend)"
            )
            print(f"{'iter':>4} {'export_s':>9} {'checksum_s':>10} {'reload_s':>9} {'total_s':>8}")
            rows = []
            for i in range(args.iters):
                model = init_model(cfg, seed=i + 1)
                t = time.perf_counter()
                version = client.update_weights(model)
                wall = time.perf_counter() - t
                s = client.last_sync
                assert client.health()[url]["weights_version"] == version
                rows.append((s.export_s, s.checksum_s, s.reload_s, wall))
                cols = f"{s.export_s:>9.2f} {s.checksum_s:>10.2f} {s.reload_s:>9.2f}"
                print(f"{i:>4} {cols} {wall:>8.2f}")
                del model
            size = sum(f.stat().st_size for f in Path(client.last_sync.path).glob("*.safetensors"))
            med = [statistics.median(col) for col in zip(*(rows[1:] or rows), strict=True)]
            print(f"export dir: {Path(client.last_sync.path).parent} ({size / 2**20:.0f} MiB)")
            print(
                f"median over iterations 1-{len(rows) - 1}: export {med[0]:.2f} s, checksum "
                f"{med[1]:.2f} s, reload {med[2]:.2f} s, total {med[3]:.2f} s"
            )
            client.close()
            fill_seconds(size)
            warm = statistics.median(fill_seconds(size) for _ in range(3))
            idle = fill_seconds(size, idle_s=5.0)
            print(
                f"filling a fresh {size / 2**20:.0f} MiB buffer: {warm:.2f} s warm, "
                f"{idle:.2f} s after 5 s idle ({size / 2**30 / warm:.1f} vs "
                f"{size / 2**30 / idle:.1f} GiB/s)"
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

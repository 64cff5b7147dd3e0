"""Runs bench/transformer.py and DALLE-pytorch's benchmark on the same sizes, one after the
other in one sitting, and prints both results with the speed ratios.

  bash bench/setup_peer.sh /tmp/peer-venv          # once: DALLE-pytorch on CPU torch
  .venv/bin/python bench/compare_peer.py --peer-python /tmp/peer-venv/bin/python \\
      -- --dim 256 --depth 4 --heads 4 --dim-head 64 --text-len 32 --grid 8 --batch 16

Everything after ``--`` goes to both scripts unchanged (their flags are the same). Prints
one JSON object: ``ours``, ``peer``, ``train_speedup`` (our training tokens/s over the
peer's) and ``sample_speedup`` (the peer's seconds per image over ours); with ``--rounds N``
the N paired results and the median of each ratio. ``train_speedup`` compares median step
times; ``train_speedup_fastest_step`` compares each side's fastest step, the estimate least
disturbed by other load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", required=True, help="python of the DALLE-pytorch venv")
    p.add_argument("--python", default=sys.executable, help="python with dalle_jax installed")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate ours / peer this many times and report the median ratios "
                        "(the machine's speed drifts over minutes; pairing runs cancels it)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the shared benchmark flags")
    a = p.parse_args()
    shared = [x for x in a.args if x != "--"]
    rounds = []
    for _ in range(a.rounds):
        ours = run_json([a.python, os.path.join(HERE, "transformer.py"), *shared])
        peer = run_json([a.peer_python, os.path.join(HERE, "peer_dalle_pytorch.py"), *shared])
        rounds.append({
            "ours": ours, "peer": peer,
            "train_speedup": round(ours["train_tokens_per_s"] / peer["train_tokens_per_s"], 2),
            "train_speedup_fastest_step": round(peer["train_step_min_s"]
                                                / ours["train_step_min_s"], 2),
            "sample_speedup": round(peer["sample_s_per_image"] / ours["sample_s_per_image"], 2)})
    out = dict(rounds[-1]) if a.rounds == 1 else {
        "rounds": rounds,
        "train_speedup": statistics.median(r["train_speedup"] for r in rounds),
        "train_speedup_fastest_step": statistics.median(
            r["train_speedup_fastest_step"] for r in rounds),
        "sample_speedup": statistics.median(r["sample_speedup"] for r in rounds)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

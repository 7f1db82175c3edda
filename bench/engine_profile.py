"""Where the engine benchmark's time goes, per generated token, from its JSON:

    python bench/engine_profile.py bench/out/engine_bench.json

For the naive loop, eft_fast EFT and the best exact speculative column of each workload:
ms per generated token in each model's forwards and in the other buckets of
eft_fast.bench.profile, then the mean ms of each model's forward by its number of tokens
(1-token decode steps, (k + 1)-token verify steps; the largest are prefills).
"""
import json
import re
import sys
from collections import defaultdict

ROLES = ("knowledge", "tuned", "reference")


def per_token(column: dict) -> dict:
    tokens = column["tokens"]
    seconds = column["breakdown"]["seconds"]
    forward = defaultdict(float)
    for key, entry in column["breakdown"]["detail"].items():
        forward[key.split()[0]] += entry["seconds"]
    out = {f"{role} forward": 1e3 * forward[role] / tokens for role in ROLES}
    out.update({bucket: 1e3 * seconds[bucket] / tokens for bucket in ("step_prep", "sampling", "scheduling", "other")})
    out["total"] = 1e3 * column["seconds"] / tokens
    return out


def forward_sizes(column: dict, max_rows: int = 6) -> list[str]:
    rows = []
    for key, entry in column["breakdown"]["detail"].items():
        role, size = re.match(r"(\S+) forward, (\d+) tokens", key).groups()
        rows.append((ROLES.index(role), int(size), entry))
    rows.sort(key=lambda r: (r[0], -r[2]["calls"], r[1]))
    shown = defaultdict(int)
    lines = []
    for role, size, entry in rows:
        if shown[role] < max_rows:
            shown[role] += 1
            lines.append(f"      {ROLES[role]:>9} x{size:<4} {entry['calls']:5d} calls  "
                         f"{1e3 * entry['seconds'] / entry['calls']:8.2f} ms/call")
    return lines


def main(path: str) -> None:
    data = json.load(open(path))
    print(f"{data['command']}  ({data['device']}, {data['threads']} threads)")
    for w in data["workloads"]:
        keys = [k for k in ("naive", "naive_batched", "eft", f"spec_k{w['best_k']}") if k in w["columns"]]
        table = {key: per_token(w["columns"][key]) for key in keys}
        print(f"\n{w['name']}: ms per generated token")
        names = list(table["eft"])
        print("  " + " " * 18 + "".join(f"{w['columns'][k]['label']:>16}" for k in keys))
        for name in names:
            print(f"  {name:18s}" + "".join(f"{table[k][name]:16.2f}" for k in keys))
        for key in keys:
            print(f"  forwards of {w['columns'][key]['label']} by tokens per call:")
            print("\n".join(forward_sizes(w["columns"][key])))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "eft_bench_out/engine_bench.json")

"""Paired bootstrap over the same held-out prompts: python paired.py NEW.json BASE.json [task]"""
import json, random, sys
task = sys.argv[3] if len(sys.argv) > 3 else "geneval"
a = {i["index"]: i["score"] for i in json.load(open(sys.argv[1]))["tasks"][task]["items"]}
b = {i["index"]: i["score"] for i in json.load(open(sys.argv[2]))["tasks"][task]["items"]}
keys = sorted(a.keys() & b.keys())
d = [a[k] - b[k] for k in keys]
rng = random.Random(0)
boots = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(10000))
print(f"{task}: new {sum(a[k] for k in keys)/len(keys):.3f} base {sum(b[k] for k in keys)/len(keys):.3f} "
      f"diff {sum(d)/len(d):+.3f} [{boots[250]:+.3f}, {boots[9749]:+.3f}] (paired bootstrap over {len(keys)} prompts)")

"""Per-step cost of two task mixes of the base schedule, measured the same way one after the other on an idle machine:
150 steps of each mix without the caption-only opening (recipe.caption_first=0), 2 threads, twice in turn (A B A B):
the median step time of steps 11-150 and the pictures each step reads (understanding) and generates (flow targets).

    python time_mix.py OUT.json [steps]
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MIXES = {
    "defaults (caption, vqa, vqa_short, generate, segment: 2,1,1,1,1)": [],
    "chat (caption, chat, generate, segment: 1,1,1,1)": ["--set", "recipe.tasks=caption,chat,generate,segment",
                                                         "--set", "recipe.task_weights=1,1,1,1"],
}


def main():
    out, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 150
    res = {"steps": steps, "machine": subprocess.run(["bash", "-c", "lscpu | grep 'Model name'; nproc"],
                                                     capture_output=True, text=True).stdout.split()}
    with tempfile.TemporaryDirectory() as tmp:
        for rep, (name, extra) in [(rep, m) for rep in (1, 2) for m in MIXES.items()]:
            run = Path(tmp) / f"{rep}-{len(res)}"
            subprocess.run(["umm", "train", "--out", str(run), "--no-resume", "--device", "cpu", "--no-progress",
                            "--steps", str(steps), "--warmup", "10", "--set", "recipe.caption_first=0",
                            "--set", "recipe.evaluate=false", "--set", "checkpoint.every=0", *extra], check=True,
                           stdout=subprocess.DEVNULL)
            rows = [json.loads(x) for x in open(run / "metrics.jsonl")][10:]
            res[f"{name} #{rep}"] = {"median_step_s": statistics.median(r["step_s"] for r in rows),
                         "mean_step_s": statistics.mean(r["step_s"] for r in rows),
                         "read_images_per_step": statistics.mean(r["read_images"] for r in rows),
                         "flow_images_per_step": statistics.mean(r["flow_images"] for r in rows),
                         "text_tokens_per_step": statistics.mean(r["text_tokens"] for r in rows),
                         "docs_per_step": statistics.mean(r["docs"] for r in rows)}
            print(name, rep, {k: round(v, 3) for k, v in res[f"{name} #{rep}"].items()}, flush=True)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""A busy machine: quantization and a quantized layer's decode, quiet and beside N CPU-bound processes.

    python -m bench.contention [--hogs 1,2,3] [--works quantize,decode-1,decode-256] [--full] [--layer 4096]
    python -m bench.contention --works quantize --dtype bfloat16   # the model in bf16: the bf16 Hessian kernel

Each measurement runs in a fresh child process (so OpenMP's wait policy, read when torch is imported, can
differ between rows) while the bench itself starts N busy-loop processes (each stops by itself after a
time limit, and is killed when the row is done). Rows:

- `quantize`: `from_pretrained(tiny Qwen2-VL, quantization_config=...)` on the built-in samples (default:
  LLM 2 layers of width 256, 2 vision blocks, 8 samples; `--full`: 4 layers of width 512, 16 samples, the
  issue's size; float32 unless `--dtype bfloat16`), in three modes: `library` (the default Python API:
  adaptive thread count, threads.py), `spin` (adaptive threads off: torch's threads spinning at barriers, the
  old behaviour), `passive` (`OMP_WAIT_POLICY=PASSIVE`, what the `hf-vlm-gptq` command sets);
- `decode-1`, `decode-256`: a 4-bit g128 QuantLinear (bf16) at 1 and 256 rows, `default` (one thread while
  CPU pressure is seen, threads.CPU_PRESSURE), `spin` (that switched off: the old behaviour) and `passive`; the
  quiet row calls it for about `--decode-seconds` (the call count it found is then used beside the hogs:
  a decode shorter than a scheduler slice or two says nothing about contention).

For each row: wall and CPU seconds, and the slowdown against the fair share: with N other processes on C
cores a run is entitled to C/(N+1) cores, so the expected wall time is the quiet CPU time divided by
min(cores used when quiet, C/(N+1)). Writes contention_cpu.{json,md} (contention_<kernel>_ / contention_<dtype>_
for a non-default --kernel / --dtype; bench.harness says where).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.harness import REPO, Stopwatch, env_info, scratch_dir, write_results

HOG = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"
MODES = {"quantize": ("library", "spin", "passive"), "decode-1": ("default", "spin", "passive"),
         "decode-256": ("default", "spin", "passive")}


def child(work: str, model_dir: str, samples: int, layer: int, calls: int, decode_seconds: float,
          kernel: str, dtype: str) -> None:
    """Run one workload in this process and print {"wall": s, "cpu": s, "calls": n} as the last line (decode:
    ``calls`` calls, or as many as take about ``decode_seconds`` when it is 0)."""
    import torch

    if work == "quantize":
        from transformers import AutoModelForImageTextToText

        import hf_vlm_gptq  # noqa: F401
        from hf_vlm_gptq import VLMGPTQConfig

        cfg = VLMGPTQConfig(num_samples=samples, w_groupsize=128, calibration_device="cpu")
        with Stopwatch() as watch:
            AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=cfg, dtype=getattr(torch, dtype))
    else:
        from hf_vlm_gptq.ops import QuantLinear, rtn_quantize

        rows = int(work.split("-")[1])
        weight = torch.randn(layer, layer, generator=torch.Generator().manual_seed(0))
        module = QuantLinear.from_result(rtn_quantize(weight, bits=4, group_size=128), bias=None,
                                         dtype=torch.bfloat16).eval()
        module.kernel = kernel
        x = torch.randn(rows, layer, dtype=torch.bfloat16)
        with torch.inference_mode():
            module(x)  # first call: kernel choice and caches
            if not calls:
                with Stopwatch() as trial:
                    for _ in range(5):
                        module(x)
                calls = max(5, round(decode_seconds / (trial.seconds / 5)))
            with Stopwatch() as watch:
                for _ in range(calls):
                    module(x)
    print(json.dumps({"wall": watch.seconds, "cpu": watch.cpu_seconds, "calls": calls if work != "quantize" else 0}))


def run_row(work: str, mode: str, hogs: int, args, model_dir: str, limit: float, calls: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if mode == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if mode == "spin":
        env["HF_VLM_GPTQ_ADAPTIVE_THREADS"] = "0"
    busy = [subprocess.Popen([sys.executable, "-c", HOG.format(limit=limit)]) for _ in range(hogs)]
    try:
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", work, "--model", model_dir,
                              "--samples", str(args.samples), "--layer", str(args.layer), "--calls", str(calls),
                              "--decode-seconds", str(args.decode_seconds), "--kernel", args.kernel,
                              "--dtype", args.dtype],
                             env=env, capture_output=True, text=True, timeout=limit, cwd=REPO)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    if out.returncode != 0:
        raise RuntimeError(f"{work} ({mode}, {hogs} hogs) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_model(root: Path, full: bool) -> str:
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    size = dict(num_llm_layers=4, hidden_size=512, vision_embed_dim=128) if full else \
        dict(num_llm_layers=2, hidden_size=256, vision_embed_dim=64)
    return str(build_tiny_qwen2vl(root / "model", seed=0, vision_depth=2, **size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hogs", default="1,2,3")
    parser.add_argument("--works", default=",".join(MODES), help=f"rows to run, of {','.join(MODES)}")
    parser.add_argument("--full", action="store_true", help="the issue's size (LLM 4 x 512, 16 samples)")
    parser.add_argument("--layer", type=int, default=4096, help="width of the decoded square layer")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds a row (and its hogs) may run")
    parser.add_argument("--decode-seconds", type=float, default=2.0, help="length of a quiet decode row")
    parser.add_argument("--kernel", default="auto", help="the decoded layer's backend (e.g. int4: what AVX2-only "
                        "CPUs take at small batches)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the quantized model's dtype (the decode rows are bf16 either way)")
    parser.add_argument("--calls", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 16 if args.full else 8
    if args.child:
        child(args.child, args.model, args.samples, args.layer, args.calls, args.decode_seconds, args.kernel,
              args.dtype)
        return
    with scratch_dir("bench_contention_") as root:
        measure(args, build_model(root, args.full))


def measure(args, model_dir: str) -> None:
    """Every row quiet, then beside 1..N hogs; prints and writes the table."""
    cores = os.cpu_count() or 1
    hog_counts = [0] + [int(n) for n in args.hogs.split(",") if n]
    env = env_info()
    rows = []
    for work, modes in MODES.items():
        if work not in args.works.split(","):
            continue
        for mode in modes:
            quiet = None
            for hogs in hog_counts:
                result = run_row(work, mode, hogs, args, model_dir, args.limit, quiet["calls"] if quiet else 0)
                if hogs == 0:
                    quiet = result
                cores_quiet = max(quiet["cpu"] / quiet["wall"], 1e-9)
                expected = quiet["cpu"] / min(cores_quiet, cores / (hogs + 1))
                row = {"work": work, "mode": mode, "hogs": hogs, "wall_s": round(result["wall"], 3),
                       "calls": result["calls"], "cpu_s": round(result["cpu"], 3), "fair_wall_s": round(expected, 3),
                       "vs_fair_share": round(result["wall"] / expected, 2)}
                rows.append(row)
                print(f"{work:<11} {mode:<8} {hogs} hogs  wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  "
                      f"fair {row['fair_wall_s']:8.2f} s  x{row['vs_fair_share']:.2f}", flush=True)
    lines = ["| work | mode | other processes | calls | wall s | CPU s | fair-share wall s | wall / fair share |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['work']} | {r['mode']} | {r['hogs']} | {r['calls'] or ''} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['fair_wall_s']} | {r['vs_fair_share']} |" for r in rows]
    size = "LLM 4 x 512, 16 samples" if args.full else "LLM 2 x 256, 8 samples"
    flags = "".join(f" --{name} {value}" for name, value, default in (
        ("works", args.works, ",".join(MODES)), ("hogs", args.hogs, "1,2,3"), ("kernel", args.kernel, "auto"),
        ("dtype", args.dtype, "float32")) if value != default) + (" --full" if args.full else "")
    md = (f"# python -m bench.contention{flags} ({env['date']}, {cores} cores, loadavg at start {env['loadavg']}, "
          f"CPU pressure {env['cpu_pressure_avg10']}%)\n\nquantize: tiny Qwen2-VL ({size}, 2 vision blocks, "
          f"{args.dtype}, w4 g128); decode: {args.layer}x{args.layer} 4-bit g128 QuantLinear, bf16, kernel={args.kernel!r}. "
          f"Goal: wall / fair share <= 1.5.\n\n" + "\n".join(lines) + "\n")
    print("\n" + md)
    stem = "contention" + ("" if args.kernel == "auto" else f"_{args.kernel}") + \
        ("" if args.dtype == "float32" else f"_{args.dtype}")
    write_results(stem, {"env": env, "rows": rows, "full": args.full, "layer": args.layer, "kernel": args.kernel,
                         "dtype": args.dtype}, md)


if __name__ == "__main__":
    main()

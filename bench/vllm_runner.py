"""The vLLM half of bench.vllm_export_check: serve an export with `vllm.LLM`, record the linear layers vLLM
built, its greedy tokens, and its scores of transformers' greedy tokens (teacher-forced).

    VLLM_PYTHON bench/vllm_runner.py JOB.json

Runs in vLLM's own interpreter (started by bench.vllm_export_check with a file path: this project is not
installed there) and imports nothing from this project. JOB.json (written by the check) names the model
folder, the prompts, the token count and where the result JSON goes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process: apply_model


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
        outputs[item["name"]] = {"prompt_ids": list(result.prompt_token_ids), "tokens": list(result.outputs[0].token_ids),
                                 "forced": _forced(llm, request, list(result.prompt_token_ids),
                                                   job["reference"]["float32"][item["name"]]["tokens"])}
    Path(job["result"]).write_text(json.dumps({
        "vllm": vllm.__version__, "torch": torch.__version__, "load_s": round(load_s, 2),
        "avx512": bool(torch.cpu._is_avx512_supported()),
        "gemm_shim": bool(getattr(ops.cpu_gemm_wna16, "vllm_cpu_shim", False)),
        "model_class": built["model_class"], "modules": built["modules"],
        "layer_methods": {name: row["method"] for name, row in built["linear"].items()},
        "layers": built["linear"], "outputs": outputs}, indent=1))


def _forced(llm, request: dict, prompt_ids: list[int], tokens: list[int]) -> list[dict] | str:
    """vLLM's scores of `tokens` fed after the prompt (teacher-forced): per position the token's logprob, the
    best logprob and the best other token's, so a greedy divergence can be told from an exact tie; or why
    they could not be scored. The prompt goes in as its text's token ids (vLLM expands the media placeholders
    again) and must come out as `prompt_ids`."""
    from vllm import SamplingParams

    forced = {key: value for key, value in request.items() if key != "prompt"}
    forced["prompt_token_ids"] = llm.get_tokenizer().encode(request["prompt"]) + tokens
    try:
        out = llm.generate(forced, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2), use_tqdm=False)[0]
    except Exception as err:  # recorded in the report; the free-running comparison stands
        return f"{type(err).__name__}: {err}"
    if list(out.prompt_token_ids) != prompt_ids + tokens:
        return f"vLLM processed the forced prompt into {len(out.prompt_token_ids)} tokens, not {len(prompt_ids + tokens)}"
    rows = []
    for token, scores in zip(tokens, out.prompt_logprobs[len(prompt_ids):]):
        others = [score.logprob for other, score in scores.items() if other != token]
        rows.append({"logprob": scores[token].logprob, "best": max(score.logprob for score in scores.values()),
                     "best_other": max(others, default=float("-inf"))})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="the job file bench.vllm_export_check wrote")
    run_vllm(parser.parse_args(argv).job)


if __name__ == "__main__":
    main()

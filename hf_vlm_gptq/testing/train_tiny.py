"""Train tiny VLMs of the registered families on the synthetic tasks of ``tasks.py``: fixtures with real skills.

Random-weight models have none of the structure that makes quantization hard (outlier channels,
modality-specific activations, peaked attention), and task accuracy cannot be measured on them. This module
trains a tiny model of any registered family (``spec_for_name(arch).build_tiny`` sizes, then AdamW on the
answer tokens) on CPU in minutes, deterministically, and caches it outside the repository::

    python -m hf_vlm_gptq.testing.train_tiny --arch qwen2_vl [--arch video_llama_3] [--force]

The cache is ``$HF_VLM_GPTQ_CACHE/trained`` (default ``~/.cache/hf_vlm_gptq/trained``), one folder per
``<arch>-<key>`` where the key hashes this file's source, ``tasks.py``, the tokenizer and the family's tiny
builder (so editing any of them retrains). A model is written to a temporary sibling folder and renamed
when complete, so a folder that exists is whole. Tests use :func:`trained_model_path` (None when the cache
is cold: they skip with a reason; CI does not train).

Scoring (:func:`evaluate`): teacher-forced exact match. The answer tokens plus the end-of-turn token are
appended to the prompt, and an item is correct when the argmax at every answer position is the next answer
token: exactly when greedy decoding would produce the answer and stop. The per-token answer distributions
come back too, for KL divergence between a float model and its quantized version.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..threads import intra_op_threads
from .tasks import KINDS, TASKS, task_samples

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPE",
    "EvalResult",
    "collate",
    "ensure_trained",
    "evaluate",
    "load_trained",
    "model_sizes",
    "train_tiny",
    "trained_model_path",
]

# The training recipe (part of the cache key through this file's source).
RECIPE: dict[str, Any] = {
    "seed": 0,
    "steps": 900,
    "batch": 20,  # two items of each of the 10 tasks per step
    "lr": 5e-4,  # 2e-3 never left the text-only prior in 300 steps; 5e-4 learns every picture task by ~500
    "warmup": 40,
    "min_lr_ratio": 0.05,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "threads": 1,
    "eval_items": 600,  # held-out items (60 per task) scored at the end
}
# Widths that make group sizes 64 and 128 meaningful (256-wide LLM and vision tower: 2 groups of 128 per row
# of q/k/v; 4 in down_proj / fc2), two blocks per tower.
SIZES: dict[str, int] = {"hidden_size": 256, "num_llm_layers": 2, "vision_depth": 2, "vision_width": 256}


def cache_root() -> Path:
    base = os.environ.get("HF_VLM_GPTQ_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "hf_vlm_gptq") / "trained"


def _source_files(arch: str) -> list[Path]:
    from ..arch import spec_for_name

    here = Path(__file__).resolve().parent
    builder = spec_for_name(arch).tiny_builder_function()
    return [Path(__file__).resolve(), here / "tasks.py", here / "_tokenizer.py",
            Path(inspect.getsourcefile(builder)).resolve()]


def cache_key(arch: str, steps: int | None = None) -> str:
    """Hash of the sources that decide what training produces (this file, tasks, tokenizer, the builder), and
    of ``steps`` when it overrides the recipe's (a shorter-trained fixture: less margin, so quantization
    changes more answers)."""
    digest = hashlib.sha256(arch.encode())
    if steps is not None and steps != RECIPE["steps"]:
        digest.update(f"steps={steps}".encode())
    for path in _source_files(arch):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def trained_dir(arch: str, steps: int | None = None) -> Path:
    return cache_root() / f"{arch}-{cache_key(arch, steps)}"


def trained_model_path(arch: str, steps: int | None = None) -> Path | None:
    """The cached trained model of ``arch`` (trained ``steps`` steps, default the recipe's), or None when it
    has not been trained with the current sources."""
    path = trained_dir(arch, steps)
    return path if (path / "training.json").is_file() else None


def model_sizes(arch: str) -> dict[str, int]:
    """Builder keyword arguments for :data:`SIZES`, by the family builder's own parameter names."""
    from ..arch import spec_for_name

    params = inspect.signature(spec_for_name(arch).tiny_builder_function()).parameters
    sizes = {k: v for k, v in SIZES.items() if k in params}
    width = SIZES["vision_width"]
    if "vision_embed_dim" in params:  # Qwen2-VL: mlp_ratio 4
        sizes["vision_embed_dim"] = width
    else:
        sizes["vision_hidden_size"] = width
        if "vision_intermediate_size" in params:
            sizes["vision_intermediate_size"] = 4 * width
    return sizes


# --- batches -----------------------------------------------------------------------------------------
@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    spans: list[tuple[int, int]]  # per row: answer tokens are input_ids[row, start:stop]
    kinds: list[str]
    tasks: list[str]


def _end_token(processor: Any) -> str:
    return processor.tokenizer.eos_token  # "<|im_end|>" for the Qwen-style templates


def collate(processor: Any, items: list[dict]) -> Batch:
    """One padded batch (right padding) of task items with their answers appended after the prompt."""
    tokenizer = processor.tokenizer
    texts, images, videos, metadata, spans_len = [], [], [], [], []
    for item in items:
        content: list[dict] = []
        if item.get("image") is not None:
            content.append({"type": "image"})
            images.append(item["image"])
        if item.get("video") is not None:
            content.append({"type": "video"})
            frames = item["video"]
            videos.append(frames)
            fps = float(item.get("video_fps") or 1.0)
            metadata.append({"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames))),
                             "duration": len(frames) / fps, "width": frames[0].size[0], "height": frames[0].size[1]})
        content.append({"type": "text", "text": item["text"]})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        answer = item["answer"] + _end_token(processor)
        texts.append(prompt + answer)
        spans_len.append(len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    kwargs: dict[str, Any] = {}
    if videos:
        kwargs.update(videos=videos, do_sample_frames=False, video_metadata=metadata)
    if images:
        kwargs["images"] = images
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        inputs = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = old_side
    lengths = inputs["attention_mask"].sum(1).tolist()
    spans = [(int(length) - n, int(length)) for length, n in zip(lengths, spans_len)]
    for row, (item, (a, b)) in enumerate(zip(items, spans)):
        want = tokenizer(item["answer"] + _end_token(processor), add_special_tokens=False)["input_ids"]
        if inputs["input_ids"][row, a:b].tolist() != want:
            raise RuntimeError(f"answer tokens of item {row} ({item['task']}) are not where expected")
    return Batch(dict(inputs), spans, [i["kind"] for i in items], [i["task"] for i in items])


def _answer_logits(logits: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Per row, the logits that predict each answer token: ``[n_answer, vocab]``."""
    return [logits[row, a - 1 : b - 1] for row, (a, b) in enumerate(batch.spans)]


def _targets(batch: Batch) -> list[torch.Tensor]:
    ids = batch.inputs["input_ids"]
    return [ids[row, a:b] for row, (a, b) in enumerate(batch.spans)]


# --- evaluation --------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Per-item exact match and answer distributions (log-probabilities, float32 ``[n_answer, vocab]``)."""

    kinds: list[str]
    tasks: list[str]
    correct: list[bool]
    logprobs: list[torch.Tensor] = field(repr=False)

    def accuracy(self, by: str = "kind") -> dict[str, float]:
        """Accuracy in percent per kind ("image", "video", "text") or per task, plus "all"."""
        keys = self.kinds if by == "kind" else self.tasks
        out: dict[str, list[bool]] = {}
        for key, ok in zip(keys, self.correct):
            out.setdefault(key, []).append(ok)
            out.setdefault("all", []).append(ok)
        return {k: 100.0 * sum(v) / len(v) for k, v in out.items()}

    def kl_from(self, reference: EvalResult) -> dict[str, float]:
        """Mean per answer token of KL(reference || self), per kind and "all" (nats)."""
        sums: dict[str, list[float]] = {}
        for kind, ref, mine in zip(self.kinds, reference.logprobs, self.logprobs):
            kl = (ref.exp() * (ref - mine)).sum(-1)
            for key in (kind, "all"):
                acc = sums.setdefault(key, [0.0, 0])
                acc[0] += float(kl.sum())
                acc[1] += kl.numel()
        return {k: s / max(1, n) for k, (s, n) in sums.items()}


def make_batches(processor: Any, items: list[dict], batch_size: int = 32) -> list[Batch]:
    return [collate(processor, items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch]) -> EvalResult:
    """Teacher-forced exact match and answer log-probabilities of ``model`` on prepared ``batches``."""
    was_training = model.training
    model.eval()
    kinds, tasks, correct, logprobs = [], [], [], []
    device = next(model.parameters()).device
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        logits = model(**inputs).logits.float()
        for row_logits, target in zip(_answer_logits(logits, batch), _targets(batch)):
            correct.append(bool((row_logits.argmax(-1) == target.to(device)).all()))
            logprobs.append(F.log_softmax(row_logits, -1).cpu())
        kinds += batch.kinds
        tasks += batch.tasks
    model.train(was_training)
    return EvalResult(kinds, tasks, correct, logprobs)


# --- training ----------------------------------------------------------------------------------------
def _lr_at(step: int, recipe: dict) -> float:
    if step < recipe["warmup"]:
        return recipe["lr"] * (step + 1) / recipe["warmup"]
    progress = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
    floor = recipe["min_lr_ratio"]
    return recipe["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tiny(arch: str, out_dir: str | Path, *, recipe: dict | None = None, progress: bool = True) -> dict:
    """Build ``arch``'s tiny model with :func:`model_sizes`, train it by ``recipe`` (default :data:`RECIPE`) and
    save it (model + processor) to ``out_dir``. Returns the training record (also written as
    ``training.json``: recipe, sizes, loss curve, held-out accuracy per kind and per task, seconds)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..arch import spec_for_name

    recipe = {**RECIPE, **(recipe or {})}
    out_dir = Path(out_dir)
    sizes = model_sizes(arch)
    start_time = time.perf_counter()
    with intra_op_threads(recipe["threads"]), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        spec_for_name(arch).build_tiny(out_dir, seed=recipe["seed"], **sizes)
        processor = AutoProcessor.from_pretrained(out_dir)
        model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"], betas=(0.9, 0.98))
        eval_batches = make_batches(processor, task_samples(recipe["eval_items"], "eval", recipe["seed"]))
        losses = []
        batch_size = recipe["batch"]
        for step in range(recipe["steps"]):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe)
            batch = collate(processor, task_samples(batch_size, "train", recipe["seed"], start=step * batch_size))
            logits = model(**batch.inputs).logits
            pred = torch.cat(_answer_logits(logits, batch))
            loss = F.cross_entropy(pred.float(), torch.cat(_targets(batch)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
            opt.step()
            losses.append(float(loss.detach()))
            if progress and (step % 50 == 0 or step + 1 == recipe["steps"]):
                elapsed = time.perf_counter() - start_time
                logger.info("[%s] step %4d loss %.4f lr %.2e %6.0f s", arch, step,
                            sum(losses[-50:]) / len(losses[-50:]), _lr_at(step, recipe), elapsed)
        train_seconds = time.perf_counter() - start_time
        model.eval()
        result = evaluate(model, eval_batches)
    model.save_pretrained(out_dir)
    record = {
        "arch": arch, "key": cache_key(arch, recipe["steps"]), "recipe": recipe, "sizes": sizes,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(train_seconds, 1), "torch": torch.__version__,
        "loss_curve": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4)
                       for i in range(0, len(losses), 50)],
        "accuracy": {k: round(v, 2) for k, v in result.accuracy("kind").items()},
        "accuracy_by_task": {k: round(v, 2) for k, v in result.accuracy("task").items()},
        "eval_items": len(result.correct),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def ensure_trained(arch: str, *, force: bool = False, progress: bool = True, steps: int | None = None) -> Path:
    """The cached trained model of ``arch`` (``steps``: see :func:`cache_key`), training it first when the cache
    has none for these sources.

    Training goes to a temporary sibling folder that is renamed into place when complete (atomic on one
    file system); a concurrent trainer that finishes first wins and the other copy is dropped.
    """
    final = trained_dir(arch, steps)
    if not force and trained_model_path(arch, steps) is not None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        train_tiny(arch, tmp, progress=progress, recipe=None if steps is None else {"steps": steps})
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if trained_model_path(arch, steps) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_trained(arch: str, dtype: torch.dtype = torch.float32, steps: int | None = None):
    """``(model, processor, path)`` of the cached trained model, or None when the cache is cold."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = trained_model_path(arch, steps)
    if path is None:
        return None
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(path), path


def _summary(record: dict) -> str:
    acc = record["accuracy"]
    tasks = ", ".join(f"{t} {record['accuracy_by_task'][t]:.1f}" for kind in KINDS for t in TASKS[kind])
    return (f"{record['arch']}: image {acc['image']:.1f}, video {acc['video']:.1f}, text {acc['text']:.1f} "
            f"(all {acc['all']:.1f}) on {record['eval_items']} held-out items; {tasks}; "
            f"{record['seconds']:.0f} s, {record['params'] / 1e6:.2f} M params")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="family name (repeatable; default qwen2_vl, video_llama_3)")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has this key")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of the recipe's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # the command shows the training progress and the result
    for arch in args.arch or ["qwen2_vl", "video_llama_3"]:
        path = ensure_trained(arch, force=args.force, steps=args.steps)
        record = json.loads((path / "training.json").read_text())
        logger.info("%s\n  %s", path, _summary(record))


if __name__ == "__main__":
    main()

"""The GPTQ options wired through the pipeline on a tiny Qwen2-VL: per-modality proxy losses in the records,
GPTAQ (equal to GPTQ where float and quantized inputs agree), group-aware order (plain g_idx), the
full-range grid, token weighting, and the config checks of the new fields."""

from __future__ import annotations

import pytest
import torch

CALIB = 12


@pytest.fixture(scope="module")
def quantized(tiny_qwen2vl_dir, builtin_samples_small):
    """Records of a few configurations (each on a fresh copy of the same tiny model).

    The tests compare losses exactly across runs, which holds only at one thread count (torch's reductions
    depend on it): the adaptive thread policy is pinned off, as a user who needs bitwise-repeatable runs would.
    """
    from transformers import AutoModelForImageTextToText

    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    out = {}
    base = {"gptaq": False, "sym_full_range": False, "percdamp": 0.01}  # plain GPTQ; each setting changes one thing
    settings = {
        "plain": {},
        "gptaq": {"gptaq": True},
        "group": {"group_order": True},
        "full": {"sym_full_range": True, "visual_w_clip": False, "llm_w_clip": False},
        "noclip": {"visual_w_clip": False, "llm_w_clip": False},
        "balanced": {"hessian_weighting": "balanced"},
        "modality": {"hessian_weighting": "modality", "modality_weights": {"image": 1.0, "video": 1.0, "text": 1.0}},
        "llm": {"quant_visual_clip": False, "quant_cross_attention": False},
        "gptaq_llm": {"quant_visual_clip": False, "quant_cross_attention": False, "gptaq": True},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")
        for name, kw in settings.items():
            model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
            cfg = VLMGPTQConfig(dataset=builtin_samples_small, num_samples=CALIB, w_groupsize=32,
                                calibration_device="cpu", **{**base, **kw})
            out[name] = (quantize(model, cfg, progress=False), model)
    return out


def test_per_modality_losses_add_up_to_the_layer_loss(quantized):
    records, _ = quantized["plain"]
    llm = [r for r in records.values() if r.component == "llm"]
    vision = [r for r in records.values() if r.component != "llm"]
    assert llm and vision
    for rec in llm:
        assert set(rec.extra) >= {"loss_image", "loss_video", "loss_text"}
    for rec in vision:
        assert set(rec.extra) >= {"loss_image", "loss_video"} and "loss_text" not in rec.extra
    for rec in records.values():
        parts = sum(v for k, v in rec.extra.items() if k.startswith("loss_"))
        assert parts == pytest.approx(rec.loss, rel=1e-3, abs=1e-9)
        assert rec.stats()["loss_image"] == rec.extra["loss_image"]  # saved with the checkpoint's stats


def test_modality_weights_of_one_are_plain(quantized):
    plain, _ = quantized["plain"]
    ones, _ = quantized["modality"]
    for path, rec in plain.items():
        assert ones[path].loss == rec.loss  # exactly: all-ones token weights give the plain Hessian


def test_the_derived_modality_loss_equals_the_directly_accumulated_one(quantized):
    """Unweighted, the modality with the most rows is derived from the layer's Hessian; all-ones weights
    accumulate every modality directly, on the same solves."""
    plain, _ = quantized["plain"]
    ones, _ = quantized["modality"]
    compared = 0
    for path, rec in plain.items():
        for key, value in rec.extra.items():
            if key.startswith("loss_"):
                assert value == pytest.approx(ones[path].extra[key], rel=1e-4, abs=1e-9), (path, key)
                compared += 1
    assert compared >= 2 * len(plain)


def test_balanced_weighting_changes_the_llm_hessian(quantized):
    plain, _ = quantized["plain"]
    balanced, _ = quantized["balanced"]
    llm = [p for p, r in plain.items() if r.component == "llm"]
    assert any(balanced[p].loss != plain[p].loss for p in llm)


def test_gptaq_equals_gptq_where_the_inputs_agree(quantized):
    """The first group of a part's first block sees the same inputs in the float and the quantized model
    (the part's float inputs are the quantized inputs there): GPTAQ solves it exactly as GPTQ."""
    for plain_name, gptaq_name, first in (("plain", "gptaq", "visual.blocks.0.attn.qkv"),
                                          ("llm", "gptaq_llm", "language_model.layers.0.self_attn.q_proj")):
        plain, plain_model = quantized[plain_name]
        gptaq, gptaq_model = quantized[gptaq_name]
        key = next(k for k in plain if k.endswith(first))
        for path in {key, key.replace("q_proj", "k_proj")}:
            # the same codes; the losses agree to rounding (plain GPTQ's comes from the sweep's errors,
            # GPTAQ's from the Hessian)
            assert torch.equal(gptaq_model.get_submodule(path).qweight, plain_model.get_submodule(path).qweight)
            assert gptaq[path].loss == pytest.approx(plain[path].loss, rel=1e-5)
        part = plain[key].component
        later = [k for k, r in plain.items() if r.component == part and (".layers.1." in k or ".blocks.1." in k)]
        assert later and any(gptaq[k].loss != plain[k].loss for k in later)


def test_group_order_keeps_plain_g_idx(quantized):
    from hf_vlm_gptq.ops import QuantLinear

    _, model = quantized["group"]
    packed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.group_size > 0]
    assert packed
    for module in packed:
        cols = torch.arange(module.in_features, dtype=module.g_idx.dtype)
        assert torch.equal(module.g_idx, cols // module.group_size)
    records, _ = quantized["group"]
    assert not any(r.act_order for r in records.values())


def test_full_range_grid_uses_the_lowest_code(quantized):
    from hf_vlm_gptq.ops import QuantLinear
    from hf_vlm_gptq.ops.packing import unpack_gptq

    def lowest_code_share(model) -> float:
        hits = total = 0
        for module in model.modules():
            if isinstance(module, QuantLinear) and module.bits == 4:
                tensors = {name: getattr(module, name) for name in ("qweight", "qzeros", "scales", "g_idx")}
                codes = unpack_gptq(tensors, module.in_features, module.out_features, module.bits)[0]
                hits += int((codes == 0).sum())
                total += codes.numel()
        return hits / total

    # without clipping the restricted grid (scale = absmax / 7) reaches code 0 only by GPTQ's error feedback
    assert lowest_code_share(quantized["full"][1]) > 0.005
    assert lowest_code_share(quantized["noclip"][1]) < lowest_code_share(quantized["full"][1]) / 5


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"act_order": True, "group_order": True}, "group_order"),
    ({"gptaq": "yes"}, "gptaq"),
    ({"gptaq_alpha": -0.5}, "gptaq_alpha"),
    ({"sym_full_range": 1}, "sym_full_range"),
    ({"hessian_weighting": "tokens"}, "hessian_weighting"),
    ({"hessian_weighting": "modality", "modality_weights": {"audio": 1.0}}, "modality_weights"),
    ({"hessian_weighting": "modality", "modality_weights": {"image": -1.0}}, "modality_weights"),
    ({"modality_weights": {"image": 2.0}}, "modality_weights"),
])
def test_new_fields_are_validated(kwargs, field):
    from hf_vlm_gptq import VLMGPTQConfig

    with pytest.raises(ValueError, match=f"VLMGPTQConfig.{field}"):
        VLMGPTQConfig(**kwargs)


def test_new_fields_round_trip_and_alias():
    from hf_vlm_gptq import VLMGPTQConfig

    cfg = VLMGPTQConfig(group_order=True, gptaq=True, gptaq_alpha=0.5, sym_full_range=True,
                        hessian_weighting="modality", modality_weights={"text": 0.5})
    back = VLMGPTQConfig.from_dict(cfg.to_dict())
    for name in ("group_order", "gptaq", "gptaq_alpha", "sym_full_range", "hessian_weighting", "modality_weights"):
        assert getattr(back, name) == getattr(cfg, name)
    assert VLMGPTQConfig(act_group_aware=True).group_order is True  # GPTQModel's name


def test_a_layer_without_usable_input_reports_no_modality_loss_rather_than_zero():
    """The derived modality's loss is the layer's minus the others': a NaN layer loss (an all-zero Hessian, no
    usable input) stays NaN there, as the others' do, instead of being clipped to 0."""
    import math

    from torch import nn

    from hf_vlm_gptq.modality import GroupInputs
    from hf_vlm_gptq.ops import rtn_quantize

    inputs = GroupInputs(nn.Linear(8, 4), is_conv=False, drop_first_channel=False)
    inputs.close()
    inputs.tokens, inputs.derived, inputs.derived_rows = 6, 0, 4  # every row labelled, 4 of the derived one
    inputs.modality_hessians = {1: (torch.zeros(8, 8), 2)}
    weight = torch.randn(4, 8)
    losses = inputs.modality_losses(weight, rtn_quantize(weight, bits=4, hessian=torch.zeros(8, 8)))
    assert len(losses) == 2 and all(math.isnan(v) for v in losses.values()), losses

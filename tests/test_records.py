"""records.py: a module's record survives module -> record -> JSON -> record -> module, the JSON layout is the
one every version wrote, the implied tensors are exactly the module's state dict, and bad fields fail by name."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hf_vlm_gptq.modules_swap import build_from_record, build_split_linear, make_quant_module
from hf_vlm_gptq.ops import rtn_quantize
from hf_vlm_gptq.records import ModuleRecord, parse_records


def _solve(weight: torch.Tensor, bits: int, group_size: int):
    return rtn_quantize(weight.detach().reshape(weight.shape[0], -1).float(), bits=bits, group_size=group_size)


def _packed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(72, 48, bias=True)  # 72 columns, groups of 32: a partial last group
        return make_quant_module(dense, _solve(dense.weight, 4, 32))
    if kind == "split_linear":
        dense = nn.Linear(65, 32, bias=False)
        return build_split_linear(dense, _solve(dense.weight[:, 1:], 3, 16))
    if kind == "conv3d":
        dense = nn.Conv3d(3, 16, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
        return make_quant_module(dense, _solve(dense.weight, 8, 32))
    dense = nn.Conv2d(3, 16, kernel_size=4, stride=2, padding="valid", bias=False)  # not a patch embedding
    return make_quant_module(dense, _solve(dense.weight, 2, -1))


# the JSON objects quantization_config.modules holds (keys and values as every version wrote them)
EXPECTED_JSON = {
    "linear": {"kind": "linear", "in_features": 72, "out_features": 48, "bits": 4, "group_size": 32, "bias": True},
    "split_linear": {"kind": "split_linear", "in_features": 65, "out_features": 32, "bits": 3, "group_size": 16,
                     "bias": False},
    "conv3d": {"kind": "conv", "conv_kind": "conv3d", "in_channels": 3, "out_channels": 16,
               "kernel_size": [2, 4, 4], "stride": [2, 4, 4], "padding": [0, 0, 0], "bits": 8, "group_size": 32,
               "bias": True},
    "conv2d": {"kind": "conv", "conv_kind": "conv2d", "in_channels": 3, "out_channels": 16, "kernel_size": [4, 4],
               "stride": [2, 2], "padding": "valid", "bits": 2, "group_size": -1, "bias": False},
}


@pytest.mark.parametrize("kind", list(EXPECTED_JSON))
def test_module_record_round_trip(kind):
    module = _packed(kind)
    record = ModuleRecord.from_module(module)
    stored = json.loads(json.dumps(record.to_dict()))  # through JSON, as config.json holds it
    assert stored == EXPECTED_JSON[kind]
    again = ModuleRecord.from_dict("m", stored)
    assert again == record and ModuleRecord.from_dict("m", again) is again
    # the implied tensors are exactly what the module saves: names, shapes, dtypes (None: any float)
    state = {f"m.{k}": v for k, v in module.state_dict().items()}
    implied = record.tensors("m")
    assert set(implied) == set(state)
    for name, (shape, dtype) in implied.items():
        assert tuple(state[name].shape) == shape, name
        assert state[name].dtype == dtype if dtype is not None else state[name].dtype.is_floating_point, name
    # the loader's empty twin built from the record takes the saved tensors as they are
    twin = build_from_record(again, torch.float32)
    twin.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 4, 8, 8) if kind == "conv3d" else torch.randn(2, 3, 8, 8) if kind == "conv2d" else \
        torch.randn(2, module.in_features)
    assert torch.equal(twin(x), module(x))


def test_packed_widths_and_groups():
    split = ModuleRecord.from_dict("s", EXPECTED_JSON["split_linear"])
    assert (split.packed_in_features, split.packed_out_features, split.n_groups) == (64, 32, 4)
    assert split.packed_prefix("a.fc2") == "a.fc2.L2" and "a.fc2.L1.weight" in split.tensors("a.fc2")
    conv = ModuleRecord.from_dict("c", EXPECTED_JSON["conv3d"])
    assert (conv.packed_in_features, conv.packed_out_features, conv.n_groups) == (3 * 2 * 4 * 4, 16, 3)
    linear = ModuleRecord.from_dict("l", EXPECTED_JSON["linear"])
    assert linear.n_groups == 3  # 72 columns in groups of 32: the last one partial
    assert linear.tensors("l")["l.qweight"] == ((72 * 4 // 32, 48), torch.int32)
    assert linear.tensors("l")["l.qzeros"] == ((3, 48 * 4 // 32), torch.int32)
    assert linear.tensors("l")["l.scales"] == ((3, 48), torch.float16)
    assert ModuleRecord.from_dict("c2", EXPECTED_JSON["conv2d"]).n_groups == 1  # -1: one group per row


def _edited(which: str, **changes) -> dict:
    out = {**EXPECTED_JSON[which], **changes}
    return {k: v for k, v in out.items() if v is not ...}


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (_edited("linear", kind="dense"), "kind"),
        (_edited("linear", bits=5), "bits"),
        (_edited("linear", bits=True), "bits"),
        (_edited("linear", group_size=0), "group_size"),
        (_edited("linear", group_size=-2), "group_size"),
        (_edited("linear", bias="yes"), "bias"),
        (_edited("linear", in_features=...), "in_features"),
        (_edited("linear", out_features=4.0), "out_features"),
        (_edited("split_linear", in_features=1), "in_features"),
        (_edited("conv3d", conv_kind="conv1d"), "conv_kind"),
        (_edited("conv3d", kernel_size=[2, 4]), "kernel_size"),
        (_edited("conv3d", padding=[0, -1, 0]), "padding"),
        (_edited("conv2d", padding="full"), "padding"),
    ],
)
def test_bad_fields_name_the_module_and_the_field(entry, field):
    with pytest.raises(ValueError, match=rf"modules\['model.layers.0.mlp'\]: field '{field}'"):
        ModuleRecord.from_dict("model.layers.0.mlp", entry)


def test_bad_containers_are_named():
    with pytest.raises(ValueError, match=r"modules\['m'\] must be a JSON object"):
        ModuleRecord.from_dict("m", [4, 32])
    with pytest.raises(ValueError, match="must map module paths to records"):
        parse_records(["m"])
    with pytest.raises(TypeError, match="no module record for a Linear"):
        ModuleRecord.from_module(nn.Linear(2, 2))
    assert parse_records({"a": EXPECTED_JSON["linear"]}) == {"a": ModuleRecord.from_dict("a", EXPECTED_JSON["linear"])}

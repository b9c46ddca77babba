"""Update encodings: fp32 is lossless, fp16/int8 deltas are bounded, compact, and reject bad input."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from common.wire.update_encoding import (
    EncodedUpdate,
    UpdateEncodingError,
    decode_update,
    encode_update,
    encoded_nbytes,
)


StateDict = dict[str, torch.Tensor]


def global_and_trained(seed: int = 0, step: float = 1e-2) -> tuple[StateDict, StateDict]:
    """(global weights, weights after a local step of about ``step`` per entry)."""
    generator = torch.Generator().manual_seed(seed)
    reference = {
        "layer4.0.conv1.weight": torch.randn(16, 8, 3, 3, generator=generator),
        "layer4.0.conv1.bias": torch.randn(16, generator=generator),
        "fc.weight": torch.randn(4, 16, generator=generator) * 50,
    }
    trained = {
        name: value + step * torch.randn(value.shape, generator=generator)
        for name, value in reference.items()
    }
    return reference, trained


def test_fp32_round_trip_is_exact_even_where_float32_deltas_would_round() -> None:
    reference = {"w": torch.tensor([1.0, 3.0e7, -2.0])}
    trained = {"w": torch.tensor([1.0e-8, 3.0e7 + 2.0, 5.0e-9])}
    decoded = decode_update(encode_update(trained, reference, "fp32"), reference)
    assert torch.equal(decoded["w"], trained["w"])


def test_fp32_round_trip_is_exact_on_a_layer_update() -> None:
    reference, trained = global_and_trained()
    encoded = encode_update(trained, reference, "fp32")
    assert encoded.scales == {}
    decoded = decode_update(encoded, reference)
    for name in trained:
        assert decoded[name].dtype == torch.float32
        assert torch.equal(decoded[name], trained[name]), name


def test_int8_error_is_at_most_half_a_step_per_tensor() -> None:
    reference, trained = global_and_trained(seed=1)
    encoded = encode_update(trained, reference, "int8")
    decoded = decode_update(encoded, reference)
    for name in trained:
        assert encoded.tensors[name].dtype == torch.int8
        scale = float(encoded.scales[name])
        delta = trained[name] - reference[name]
        assert scale == pytest.approx(float(delta.abs().max()) / 127, rel=1e-6)
        float32_rounding = 2 * torch.finfo(torch.float32).eps * float(trained[name].abs().max())
        error = float((decoded[name] - trained[name]).abs().max())
        assert error <= scale / 2 + float32_rounding, name


def test_int8_uses_the_full_symmetric_code_range() -> None:
    reference = {"w": torch.zeros(5)}
    trained = {"w": torch.tensor([-0.4, -0.1, 0.0, 0.2, 0.4])}
    codes = encode_update(trained, reference, "int8").tensors["w"]
    assert codes.tolist() == [-127, -32, 0, 64, 127]


def test_fp16_error_is_relative_to_each_delta_entry() -> None:
    reference, trained = global_and_trained(seed=2)
    encoded = encode_update(trained, reference, "fp16")
    assert encoded.scales == {}
    decoded = decode_update(encoded, reference)
    for name in trained:
        assert encoded.tensors[name].dtype == torch.float16
        delta = trained[name] - reference[name]
        bound = delta.abs() * 2.0**-11 + 2.0**-24 + 2 * torch.finfo(torch.float32).eps * trained[name].abs()
        assert bool(((decoded[name] - trained[name]).abs() <= bound).all()), name


def test_deltas_quantise_far_better_than_weights_would() -> None:
    reference, trained = global_and_trained(seed=3, step=1e-3)
    decoded = decode_update(encode_update(trained, reference, "int8"), reference)
    delta_error = float((decoded["fc.weight"] - trained["fc.weight"]).abs().max())
    weight_step = float(trained["fc.weight"].abs().max()) / 127  # what quantising the weights would cost
    assert delta_error < weight_step / 100


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_an_unchanged_tensor_decodes_to_the_reference(encoding: str) -> None:
    reference = {"w": torch.randn(3, 4), "zero": torch.zeros(6)}
    encoded = encode_update({k: v.clone() for k, v in reference.items()}, reference, encoding)
    if encoding == "int8":
        assert float(encoded.scales["w"]) == 0.0
        assert not encoded.tensors["w"].any()
    decoded = decode_update(encoded, reference)
    for name in reference:
        assert torch.equal(decoded[name], reference[name]), name


def test_int8_is_about_a_quarter_and_fp16_half_of_fp32_bytes() -> None:
    reference, trained = global_and_trained(seed=4)
    fp32 = encoded_nbytes(encode_update(trained, reference, "fp32"))
    assert fp32 == 4 * sum(t.numel() for t in trained.values())
    assert encoded_nbytes(encode_update(trained, reference, "fp16")) == fp32 // 2
    int8 = encoded_nbytes(encode_update(trained, reference, "int8"))
    assert int8 == fp32 // 4 + 4 * len(trained)  # codes plus one float32 scale per tensor
    assert 0.24 < int8 / fp32 < 0.27


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_naming_the_tensor(encoding: str, bad_value: float) -> None:
    reference, trained = global_and_trained(seed=5)
    trained["fc.weight"][1, 2] = bad_value
    with pytest.raises(UpdateEncodingError, match=r"'fc\.weight'.*NaN/inf"):
        encode_update(trained, reference, encoding)


def test_shape_mismatch_is_rejected_naming_the_tensor() -> None:
    reference, trained = global_and_trained(seed=6)
    trained["fc.weight"] = torch.zeros(5, 16)
    with pytest.raises(UpdateEncodingError, match=r"'fc\.weight' has shape \(5, 16\).*\(4, 16\)"):
        encode_update(trained, reference, "int8")


def test_dtype_mismatch_is_rejected_naming_the_tensor() -> None:
    reference, trained = global_and_trained(seed=7)
    trained["layer4.0.conv1.bias"] = trained["layer4.0.conv1.bias"].half()
    with pytest.raises(UpdateEncodingError, match=r"'layer4\.0\.conv1\.bias' is torch\.float16"):
        encode_update(trained, reference, "fp16")


def test_missing_or_extra_tensors_are_rejected() -> None:
    reference, trained = global_and_trained(seed=8)
    del trained["fc.weight"]
    trained["head.weight"] = torch.zeros(2)
    with pytest.raises(UpdateEncodingError, match=r"missing \['fc\.weight'\], unexpected \['head\.weight'\]"):
        encode_update(trained, reference, "fp32")


def test_fp16_delta_beyond_float16_range_is_rejected() -> None:
    with pytest.raises(UpdateEncodingError, match=r"'w' changed by .*float16"):
        encode_update({"w": torch.tensor([1.0e6])}, {"w": torch.tensor([0.0])}, "fp16")


def test_unknown_encoding_is_rejected() -> None:
    reference, trained = global_and_trained()
    with pytest.raises(UpdateEncodingError, match="bf8"):
        encode_update(trained, reference, "bf8")  # type: ignore[arg-type]


def test_decoding_int8_without_its_scale_is_rejected() -> None:
    reference, trained = global_and_trained(seed=9)
    encoded = encode_update(trained, reference, "int8")
    del encoded.scales["fc.weight"]
    with pytest.raises(UpdateEncodingError, match=r"'fc\.weight' arrived without a scale"):
        decode_update(encoded, reference)


def test_decoding_a_scale_for_a_non_int8_tensor_is_rejected() -> None:
    reference, trained = global_and_trained(seed=10)
    encoded = encode_update(trained, reference, "fp16")
    encoded.scales["fc.weight"] = torch.tensor(0.1)
    with pytest.raises(UpdateEncodingError, match=r"scales given for \['fc\.weight'\]"):
        decode_update(encoded, reference)


def test_decoding_against_a_reference_of_another_shape_is_rejected() -> None:
    reference, trained = global_and_trained(seed=11)
    encoded = encode_update(trained, reference, "int8")
    reference["fc.weight"] = torch.zeros(2, 16)
    with pytest.raises(UpdateEncodingError, match=r"'fc\.weight' has shape \(4, 16\)"):
        decode_update(encoded, reference)


def test_encoded_int8_update_survives_flower_array_records() -> None:
    reference, trained = global_and_trained(seed=12)
    encoded = encode_update(trained, reference, "int8")
    shipped = EncodedUpdate(
        tensors=ArrayRecord(encoded.tensors).to_torch_state_dict(),
        scales=ArrayRecord(encoded.scales).to_torch_state_dict(),
    )
    received, local = decode_update(shipped, reference), decode_update(encoded, reference)
    for name in trained:
        assert torch.equal(received[name], local[name]), name

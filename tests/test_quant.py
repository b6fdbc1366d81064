"""LUT quantisation: NF4 levels, per-row/per-block round-trip error bounds, storage sizes."""

import numpy as np
import pytest

from mole_jax.stores import quant

# QLoRA's published NF4 levels (Dettmers et al. 2023, Appendix E).
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

X = (
    np.random.default_rng(0).standard_normal((7, 3, 128)).astype(np.float32)
    * np.array([0.01, 1.0, 30.0], np.float32)[None, :, None]
)  # rows of very different scales


def test_nf4_codebook_matches_qlora():
    np.testing.assert_allclose(quant.nf4_codebook(), QLORA_NF4, atol=1e-6)


def test_int8_error_is_at_most_half_a_step_per_row():
    stored = quant.quantize(X, "int8")
    assert stored["values"].dtype == np.int8 and stored["scales"].shape == (7, 3)
    err = np.abs(np.asarray(quant.dequantize(stored, "int8")) - X)
    step = np.abs(X).max(-1) / 127
    assert (err.max(-1) <= 0.5 * step * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("block", [32, 64, 128])
def test_nf4_error_is_bounded_by_half_the_widest_level_gap_per_block(block):
    stored = quant.quantize(X, "nf4", block)
    assert stored["values"].shape == (7, 3, 64) and stored["values"].dtype == np.uint8
    assert stored["scales"].shape == (7, 3, 128 // block)
    y = np.asarray(quant.dequantize(stored, "nf4", block))
    half_gap = np.diff(quant.nf4_codebook()).max() / 2
    absmax = np.abs(X.reshape(7, 3, -1, block)).max(-1)
    err = np.abs(y - X).reshape(7, 3, -1, block).max(-1)
    # + the float16 rounding of the stored absmax (relative 2^-11) applied to |x| <= absmax
    assert (err <= absmax * (half_gap + 2**-10)).all()


def test_float_formats_round_trip():
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(quant.quantize(X, "float32"), "float32")), X
    )
    y16 = np.asarray(quant.dequantize(quant.quantize(X, "float16"), "float16"))
    np.testing.assert_allclose(y16, X, rtol=2**-11, atol=1e-7)
    ybf = np.asarray(quant.dequantize(quant.quantize(X, "bfloat16"), "bfloat16"))
    np.testing.assert_allclose(ybf, X, rtol=2**-8, atol=1e-30)


def test_row_bytes():
    assert quant.row_bytes("float32", 768, 64) == 3072
    assert quant.row_bytes("float16", 768, 64) == 1536
    assert quant.row_bytes("int8", 768, 64) == 768 + 4
    assert quant.row_bytes("nf4", 768, 64) == 384 + 12 * 2
    assert quant.row_bytes("nf4", 768, 768) == 384 + 2  # Table 8's block of 768

import pytest

from sage_megatron.parallel.layout import LayoutError, ParallelLayout, padded_vocab_size, validate_layout


def test_valid_layout_passes():
    validate_layout(ParallelLayout(2, 2, 2), num_layers=4, num_attention_heads=8, num_query_groups=2, world_size=8)


def test_world_size_mismatch_names_both_numbers():
    with pytest.raises(LayoutError, match=r"world size 6 != tp\*pp\*dp = 2\*2\*1 = 4"):
        validate_layout(ParallelLayout(2, 2, 1), num_layers=4, num_attention_heads=8, num_query_groups=2, world_size=6)


def test_heads_groups_layers_all_reported_with_fixes():
    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelLayout(tp=2, pp=4), num_layers=30, num_attention_heads=9, num_query_groups=3)
    msg = str(err.value)
    assert "num_attention_heads=9 is not divisible by tp=2: use tp in [1, 3, 9]" in msg
    assert "(query groups)=3 is not divisible by tp=2: use tp in [1, 3]" in msg
    assert "num_hidden_layers=30 is not divisible by pp=4: use pp in [1, 2, 3, 5, 6, 10, 15, 30]" in msg


def test_nonpositive_sizes_rejected():
    with pytest.raises(LayoutError, match="pp=0 must be >= 1"):
        validate_layout(ParallelLayout(1, 0, 1), num_layers=2, num_attention_heads=2, num_query_groups=2)


@pytest.mark.parametrize("vocab,tp,expected", [
    (49152, 1, 49152), (49152, 3, 49152),      # 49152 = 384 * 128
    (99, 1, 128), (99, 2, 128), (99, 8, 128),  # same padded size for every power-of-two tp
    (129, 1, 256), (100, 3, 384),              # lcm(128, 3) = 384
])
def test_padded_vocab(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp=tp) == expected

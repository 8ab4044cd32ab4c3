import pytest

from pear_kernels import PEARConfig, Variant


def test_defaults_follow_the_spec():
    c = PEARConfig()
    assert c.variant is Variant.TOKEN
    assert c.gamma == 0.999 and c.block_size == 4
    assert c.delta_clip == (-0.08, 0.3) and c.log_weight_clip == (-10.0, 5.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"variant": "tokens"}, "variant"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": "high"}, "gamma"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"delta_clip": (0.3, -0.08)}, "delta_clip"),
        ({"delta_clip": 0.3}, "delta_clip"),
        ({"log_weight_clip": (1.0, float("nan"))}, "log_weight_clip"),
    ],
)
def test_invalid_fields_are_named(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        PEARConfig(**kwargs)


def test_overrides_and_enum_parsing():
    c = PEARConfig().with_overrides(variant="BLOCK", block_size=8, gamma=None)
    assert c.variant is Variant.BLOCK and c.block_size == 8 and c.gamma == 0.999
    with pytest.raises(TypeError, match="unknown"):
        PEARConfig().with_overrides(gama=0.9)
    assert PEARConfig(variant=Variant.NONE).to_dict()["variant"] == "none"

"""One bad image is not fatal (issue 10): an image that cannot be decoded is skipped, counted and listed by
evaluate and inference, and replaced by another sample in training until more than
dataset.max_bad_image_fraction of the training images failed."""

from __future__ import annotations

import pytest

from groundlab.config import ConfigError, check_config


@pytest.mark.parametrize("model", [["model=gdino"], ["model=mal", "dataset=mal_synthetic"]])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_bad_image_fraction_must_be_a_fraction(compose, model, value):
    with pytest.raises(ConfigError) as info:
        check_config(compose(model + [f"dataset.max_bad_image_fraction={value}"]))
    assert f"dataset.max_bad_image_fraction={value} must be in [0, 1]" in str(info.value)
    check_config(compose(model + ["dataset.max_bad_image_fraction=0.0"]))
    check_config(compose(model + ["dataset.max_bad_image_fraction=1"]))

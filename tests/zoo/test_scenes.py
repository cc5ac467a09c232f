"""The scene renderer: deterministic, each attribute visible in the pixels, words of language A."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shoal.zoo.languages import A_WORDS
from shoal.zoo.scenes import (BACKGROUND, COLOURS, SHAPES, SIZES, Scene, Thing, random_scene,
                              render, to_pil)


def _colour_pixels(image: np.ndarray, colour: str) -> int:
    return int(np.all(image == np.array(COLOURS[colour], dtype=np.uint8), axis=-1).sum())


def test_same_scene_same_bytes_and_random_scenes_repeat_per_seed():
    a = [random_scene(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert render(a[0]).tobytes() == render(a[1]).tobytes()
    assert random_scene(random.Random(7)) != random_scene(random.Random(8))


def test_every_word_is_a_word_of_language_a():
    for word in (*SHAPES, *COLOURS, *SIZES, "and", "."):
        assert word in A_WORDS or word == "."
    scene = random_scene(random.Random(3), max_things=4)
    assert all(w in A_WORDS or w == "." for w in scene.describe().split())


def test_thing_lands_in_its_cell_with_its_colour():
    scene = Scene(things=(Thing("apples", "red", "big", cell=3),), grid=2)
    image = render(scene, size=32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # the whole red mass sits in the bottom-right quadrant, the rest is background
    red = np.all(image == np.array(COLOURS["red"], dtype=np.uint8), axis=-1)
    rows, cols = np.nonzero(red)
    assert rows.min() >= 16 and cols.min() >= 16
    assert np.all(image[:16, :16] == np.array(BACKGROUND, dtype=np.uint8))


def test_big_is_bigger_than_small_and_shapes_differ():
    big = render(Scene(things=(Thing("cups", "blue", "big", 0),), grid=1), size=32)
    small = render(Scene(things=(Thing("cups", "blue", "small", 0),), grid=1), size=32)
    assert _colour_pixels(big, "blue") > 2.5 * _colour_pixels(small, "blue")
    masks = {obj: np.all(render(Scene(things=(Thing(obj, "green", "big", 0),), grid=1)) ==
                         np.array(COLOURS["green"], dtype=np.uint8), axis=-1)
             for obj in SHAPES}
    names = list(masks)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert (masks[first] != masks[second]).sum() > 20, (first, second)


def test_count_and_description():
    scene = Scene(things=(Thing("hats", "red", "small", 2), Thing("apples", "red", "big", 0),
                          Thing("hats", "blue", "big", 1)), grid=2)
    assert scene.count(obj="hats") == 2 and scene.count(colour="red") == 2
    assert scene.count(obj="hats", colour="red") == 1 and scene.count(size="big") == 2
    assert scene.describe() == "big red apples and big blue hats and small red hats ."
    assert scene.in_cell(1).obj == "hats" and scene.in_cell(3) is None


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="share a cell"):
        Scene(things=(Thing("hats", "red", "small", 0), Thing("cups", "red", "small", 0)))
    with pytest.raises(ValueError, match="outside"):
        Scene(things=(Thing("hats", "red", "small", 4),), grid=2)
    with pytest.raises(ValueError, match="unknown"):
        Scene(things=(Thing("dogs", "red", "small", 0),))
    with pytest.raises(ValueError, match="do not fit"):
        random_scene(random.Random(0), grid=2, min_things=5)


def test_pil_image():
    image = to_pil(render(random_scene(random.Random(1)), size=24))
    assert image.size == (24, 24) and image.mode == "RGB"

"""The DFS genome: indicator array over T = M r slots, scaling, fixed endpoints, limits."""

from __future__ import annotations

import math
import random

import pytest

from shoal.errors import ConfigError
from shoal.flow.genes import from_range, to_range
from shoal.flow.genome import DfsLayout, DfsSpace
from shoal.flow.path import Hop, identity_path, make_path

COUNTS = (4, 3)  # model 0 has 4 layers, model 1 has 3: M = 7


def random_genome(space, rng):
    return {k: rng.random() for k in space.keys}


def by_hand(genome, counts, repeats, limit, scaling, low=0.0, high=2.0):
    """The decoding written out plainly, for comparison."""
    m = sum(counts)
    owner = [(model, layer) for model, c in enumerate(counts) for layer in range(c)]
    on = [t for t in range(m * repeats) if genome[f"I{t}"] > 0.5]
    if limit is not None and len(on) > limit - 2:
        on = sorted(sorted(on, key=lambda t: (-genome[f"I{t}"], t))[:limit - 2])

    def scale(x):
        return low + (high - low) * (1 - math.cos(math.pi * x)) / 2

    hops, prev = [(0, 0, 1.0)], 0
    for t in on:
        j = t % m
        s = scale(genome[f"W{prev}.{j}"]) if scaling == "matrix" else scale(genome[f"S{t}"])
        hops.append((*owner[j], s))
        prev = j
    end = counts[0] - 1
    hops.append((0, end, scale(genome[f"W{prev}.{end}"]) if scaling == "matrix" else 1.0))
    return hops


def test_gene_counts_and_names():
    space = DfsSpace(DfsLayout(COUNTS, repeats=3))
    assert space.layout.scaling == "matrix"  # the paper's M x M scaling matrix is the default
    assert space.num_slots == 21 and space.size == 21 + 49
    assert sorted(k for k in space.default_genome() if k.startswith("W")) == \
        sorted(f"W{i}.{j}" for i in range(7) for j in range(7))
    compact = DfsSpace(DfsLayout(COUNTS, repeats=3, scaling="per_slot"))
    assert compact.size == 42 and compact.keys[21] == "S0"


def test_default_genome_is_the_first_model_itself():
    for scaling in ("matrix", "per_slot"):
        space = DfsSpace(DfsLayout(COUNTS, repeats=2, scaling=scaling, scale_range=(0.25, 3.0)))
        path = space.decode(space.default_genome())
        assert [(h.model, h.layer) for h in path] == [(0, 0), (0, 1), (0, 2), (0, 3)]
        assert all(h.scale == pytest.approx(1.0) for h in path)


@pytest.mark.parametrize("scaling", ["matrix", "per_slot"])
@pytest.mark.parametrize("limit", [None, 2, 6])
def test_decoding_matches_the_plain_description(scaling, limit):
    rng = random.Random(7)
    space = DfsSpace(DfsLayout(COUNTS, repeats=3, max_hops=limit, scaling=scaling))
    for _ in range(20):
        genome = random_genome(space, rng)
        path = space.decode(genome)
        expected = by_hand(genome, COUNTS, 3, limit, scaling)
        assert [(h.model, h.layer) for h in path] == [(m, layer) for m, layer, _ in expected]
        assert [h.scale for h in path] == pytest.approx([s for _, _, s in expected])
        assert path[0] == Hop(0, 0, 1.0) and path[-1].key == (0, 3)  # fixed endpoints
        if limit is not None:
            assert len(path) <= limit


def test_the_limit_keeps_the_strongest_slots():
    space = DfsSpace(DfsLayout(COUNTS, repeats=1, max_hops=4, scaling="per_slot"))
    genome = space.default_genome()
    genome.update({"I2": 0.9, "I4": 0.95, "I5": 0.6, "I6": 0.8})  # I1 is on at 0.75 too
    path = space.decode(genome)
    # on: I1 .75, I2 .9, I4 .95, I5 .6, I6 .8; room for 2: slots 4 and 2, in slot order
    assert [h.key for h in path] == [(0, 0), (0, 2), (1, 0), (0, 3)]


def test_round_trip_path_genome_path():
    rng = random.Random(3)
    for scaling in ("matrix", "per_slot"):
        space = DfsSpace(DfsLayout(COUNTS, repeats=3, max_hops=12, scaling=scaling))
        for _ in range(20):
            path = space.decode(random_genome(space, rng))
            again = space.decode(space.encode(path))
            assert [h.key for h in again] == [h.key for h in path]
            assert [h.scale for h in again] == pytest.approx([h.scale for h in path], abs=1e-9)


def test_encode_a_hand_written_path():
    space = DfsSpace(DfsLayout(COUNTS, repeats=3, scaling="per_slot"))
    path = make_path([(0, 0), (0, 1), (1, 2, 0.5), (1, 0, 1.5), (0, 1), (0, 3)])
    genome = space.encode(path)
    # M = 7. (0,1) is global layer 1 -> slot 1; (1,2) is global 6 -> slot 6; (1,0) is global 4,
    # first slot after 6 holding it -> 11; (0,1) again -> 15.
    assert [t for t in range(space.num_slots) if genome[f"I{t}"] > 0.5] == [1, 6, 11, 15]
    assert to_range(genome["S6"], 0.0, 2.0) == pytest.approx(0.5)
    assert to_range(genome["S11"], 0.0, 2.0) == pytest.approx(1.5)
    decoded = space.decode(genome)
    assert [h.key for h in decoded] == [h.key for h in path]
    assert [h.scale for h in decoded] == pytest.approx([h.scale for h in path])


def test_paths_the_genome_cannot_hold():
    space = DfsSpace(DfsLayout(COUNTS, repeats=1, max_hops=5, scaling="matrix"))
    with pytest.raises(ConfigError, match="starts with model 0's layer 0"):
        space.encode(make_path([(1, 0), (0, 3)]))
    with pytest.raises(ConfigError, match="more than r=1 passes"):
        space.encode(make_path([(0, 0), (1, 1), (0, 1), (0, 3)]))
    with pytest.raises(ConfigError, match="more than the limit"):
        space.encode(make_path([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (0, 3)]))
    with pytest.raises(ConfigError, match="the matrix holds one"):
        DfsSpace(DfsLayout(COUNTS, repeats=2)).encode(
            make_path([(0, 0), (0, 1, 0.5), (0, 0), (0, 1, 0.7), (0, 3)]))
    with pytest.raises(ConfigError, match="first model needs >= 2 layers"):
        DfsLayout((1, 3))


def test_scale_gene_transform_round_trips():
    for value in (0.0, 0.3, 1.0, 1.7, 2.0):
        assert to_range(from_range(value, 0.0, 2.0), 0.0, 2.0) == pytest.approx(value, abs=1e-12)
    for scale_range in ((0.0, 2.0), (0.25, 3.0), (1.0, 4.0)):
        space = DfsSpace(DfsLayout(COUNTS, scale_range=scale_range))
        assert space.decode(space.default_genome()) == identity_path(4)  # scales exactly 1

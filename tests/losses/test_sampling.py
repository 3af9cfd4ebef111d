"""Region and pixel sampling (LRC_METHOD section 5)."""

from __future__ import annotations

import pytest
import torch

from lrc_ray.losses import RegionSamples, gather_embeddings, sample_region_pixels


def random_region_maps(seed: int, batch: int = 4, size: tuple[int, int] = (12, 10), num_ids: int = 9):
    """Two views whose id sets overlap only partly (some ids visible in one view only)."""
    generator = torch.Generator().manual_seed(seed)
    view1 = torch.randint(-1, num_ids, (batch, *size), generator=generator)
    view2 = torch.randint(-1, num_ids, (batch, size[1] + 3, size[0]), generator=generator)
    view1[view1 == num_ids - 1] = -1  # the last id only ever appears in view 2
    view2[view2 == num_ids - 2] = -1  # the one before only in view 1
    return view1, view2


def shared_ids(view1: torch.Tensor, view2: torch.Tensor) -> set[int]:
    return (set(view1[view1 >= 0].tolist()) & set(view2[view2 >= 0].tolist()))


def slot_ids(samples: RegionSamples, pixels_per_region: int) -> torch.Tensor:
    """Region id per slot. Shape: (B, S)."""
    per_view = samples.region_ids.shape[1] // 2
    return samples.region_ids[:, :per_view:pixels_per_region]


@pytest.mark.parametrize("regions_per_image", [1, 3, 20])
def test_samples_lie_in_their_region_in_both_views(regions_per_image):
    view1, view2 = random_region_maps(0)
    pixels_per_region = 5
    samples = sample_region_pixels(
        view1, view2, regions_per_image=regions_per_image, pixels_per_region=pixels_per_region,
        seeds=torch.arange(view1.shape[0]) + 1,
    )
    batch, samples_per_view = view1.shape[0], regions_per_image * pixels_per_region
    assert samples.view1_index.shape == samples.view2_index.shape == (batch, samples_per_view)
    assert samples.region_ids.shape == (batch, 2 * samples_per_view)
    ids_view1, ids_view2 = samples.region_ids.split(samples_per_view, dim=1)
    assert torch.equal(ids_view1, ids_view2)
    valid = ids_view1 >= 0
    for view, index in ((view1, samples.view1_index), (view2, samples.view2_index)):
        assert index.dtype == torch.long
        assert ((index >= 0) & (index < view[0].numel())).all()
        picked = view.reshape(batch, -1).gather(1, index)
        assert torch.equal(picked[valid], ids_view1[valid])
        assert (index[~valid] == 0).all()


def test_regions_are_shared_distinct_and_as_many_as_possible():
    view1, view2 = random_region_maps(2)
    regions_per_image, pixels_per_region = 4, 2
    samples = sample_region_pixels(
        view1, view2, regions_per_image=regions_per_image, pixels_per_region=pixels_per_region,
        seeds=torch.arange(view1.shape[0]) + 3,
    )
    slots = slot_ids(samples, pixels_per_region)
    assert torch.equal(samples.region_ids[:, : regions_per_image * pixels_per_region],
                       slots.repeat_interleave(pixels_per_region, dim=1))
    for image in range(view1.shape[0]):
        shared = shared_ids(view1[image], view2[image])
        drawn = [r for r in slots[image].tolist() if r >= 0]
        assert len(drawn) == len(set(drawn)) == min(regions_per_image, len(shared))
        assert set(drawn) <= shared
        # Padding only at the end.
        assert slots[image, len(drawn):].eq(-1).all()


def test_fewer_shared_regions_than_requested_pads():
    view1 = torch.tensor([[[0, 0, 1], [1, 2, -1]], [[-1, -1, -1], [-1, -1, -1]]])
    view2 = torch.tensor([[[2, 2, 3], [0, -1, 3]], [[0, 1, 2], [3, 4, 5]]])
    samples = sample_region_pixels(view1, view2, regions_per_image=4, pixels_per_region=3, seeds=torch.arange(2))
    slots = slot_ids(samples, 3)
    # Image 0 shares ids {0, 2}; image 1 shares nothing (view 1 is all ignored).
    assert sorted(slots[0, :2].tolist()) == [0, 2]
    assert slots[0, 2:].eq(-1).all() and slots[1].eq(-1).all()
    assert samples.view1_index[0, 6:].eq(0).all() and samples.view2_index[1].eq(0).all()
    assert samples.region_ids[1].eq(-1).all()


def test_no_region_anywhere():
    empty = torch.full((2, 4, 4), -1)
    samples = sample_region_pixels(empty, empty, regions_per_image=2, pixels_per_region=3, seeds=torch.arange(2))
    assert samples.region_ids.shape == (2, 12) and samples.region_ids.eq(-1).all()
    assert samples.view1_index.shape == (2, 6) and samples.view1_index.eq(0).all()


def test_seeded_reproducibility():
    view1, view2 = random_region_maps(4)

    def draw(seed):
        return sample_region_pixels(
            view1, view2, regions_per_image=3, pixels_per_region=4, seeds=torch.arange(view1.shape[0]) + seed
        )

    first, again, other = draw(10), draw(10), draw(11)
    for name in ("view1_index", "view2_index", "region_ids"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.view1_index, other.view1_index)


def test_one_map_for_both_views_draws_what_two_equal_maps_draw():
    # Without augmentation both views are one tensor, whose bins and counts are computed once.
    view1, _ = random_region_maps(5)
    seeds = torch.arange(view1.shape[0]) + 3
    shared = sample_region_pixels(view1, view1, regions_per_image=3, pixels_per_region=4, seeds=seeds)
    apart = sample_region_pixels(view1, view1.clone(), regions_per_image=3, pixels_per_region=4, seeds=seeds)
    for name in ("view1_index", "view2_index", "region_ids"):
        assert torch.equal(getattr(shared, name), getattr(apart, name)), name
    assert not torch.equal(shared.view1_index, shared.view2_index), "each view draws its own pixels"


def test_an_image_draws_the_same_alone_or_in_any_batch():
    # What makes 2 data-parallel workers with batch B draw exactly what 1 worker with batch 2B draws.
    view1, view2 = random_region_maps(6, batch=5)
    seeds = torch.tensor([7, 70, 700, 7000, 70000])
    whole = sample_region_pixels(view1, view2, regions_per_image=3, pixels_per_region=4, seeds=seeds)
    for members in ([2], [4, 0], [1, 3, 2]):
        part = sample_region_pixels(view1[members], view2[members], regions_per_image=3, pixels_per_region=4,
                                    seeds=seeds[members], num_ids=12)
        for name in ("view1_index", "view2_index", "region_ids"):
            assert torch.equal(getattr(part, name), getattr(whole, name)[members]), name


def test_pixels_are_distinct_in_regions_of_at_least_m_and_repeat_least_below():
    # Regions of 1..12 pixels in each view; M = 5: regions of >= 5 pixels give 5 distinct ones,
    # smaller ones give every pixel floor(5/n) or ceil(5/n) times.
    sizes = torch.arange(1, 13)
    row = torch.arange(12).repeat_interleave(sizes)  # 78 pixels, region r has r + 1 of them
    view1 = row.reshape(6, 13).expand(8, -1, -1)
    view2 = row.flip(0).reshape(13, 6).expand(8, -1, -1)
    pixels_per_region = 5
    samples = sample_region_pixels(view1, view2, regions_per_image=12, pixels_per_region=pixels_per_region,
                                   seeds=torch.arange(8))
    slots = slot_ids(samples, pixels_per_region)
    checked = 0
    for view, index in ((view1, samples.view1_index), (view2, samples.view2_index)):
        for image in range(view.shape[0]):
            for slot, picked in zip(slots[image].tolist(), index[image].split(pixels_per_region)):
                assert (view[image].reshape(-1)[picked] == slot).all(), "every pixel in its region"
                region_size = slot + 1
                times = torch.bincount(picked, minlength=78)[picked.unique()]
                if region_size >= pixels_per_region:
                    assert len(picked.unique()) == pixels_per_region, (slot, picked)
                else:
                    assert len(picked.unique()) == region_size, (slot, picked)
                    assert times.max() - times.min() <= 1, (slot, picked)
                checked += 1
    assert checked == 2 * 8 * 12


def test_draws_without_replacement_cover_the_region_uniformly():
    # A region of 6 pixels, M = 3: every 3-subset is equally likely (20 of them), and each
    # pixel is in half of the draws. Bounds are ~6 standard deviations.
    view = torch.tensor([[[0, 0, 0, 0, 0, 0, -1]]])
    draws = 4000
    samples = sample_region_pixels(view.expand(draws, -1, -1), view.expand(draws, -1, -1), regions_per_image=1,
                                   pixels_per_region=3, seeds=torch.arange(draws))
    subsets = samples.view1_index.sort(dim=1).values
    assert (subsets[:, 1:] > subsets[:, :-1]).all(), "three distinct pixels per draw"
    codes = (subsets * torch.tensor([36, 6, 1])).sum(dim=1)
    frequency = torch.bincount(codes, minlength=216)[codes.unique()].double() / draws
    assert len(frequency) == 20
    assert (frequency - 1 / 20).abs().max() < 6 * ((1 / 20) * (19 / 20) / draws) ** 0.5


def test_a_region_short_of_kept_pixels_is_drawn_again_from_all_its_pixels(monkeypatch):
    # Keys below the threshold are kept; with a threshold near 0 almost none are: the batch is drawn
    # again keeping every pixel, and the samples are still distinct and in their regions.
    from lrc_ray.losses import sampling

    monkeypatch.setattr(sampling, "_key_threshold", lambda m, pixels: torch.full(pixels.shape, 1e-9, dtype=torch.float64))
    view = torch.arange(4).repeat_interleave(50).view(1, 10, 20).expand(8, -1, -1).contiguous()
    samples = sample_region_pixels(view, view, regions_per_image=4, pixels_per_region=5, seeds=torch.arange(8))
    for image in range(8):
        for slot, pixels in enumerate(samples.view2_index[image].view(4, 5).tolist()):
            assert len(set(pixels)) == 5
            assert all(int(view[image].reshape(-1)[p]) == int(samples.region_ids[image, slot * 5]) for p in pixels)


def test_pixels_of_a_large_region_are_uniform():
    # 200 pixels, M = 4: only the pixels of smallest keys are sorted; every pixel is still equally likely.
    view = torch.zeros(500, 10, 20, dtype=torch.long)
    samples = sample_region_pixels(view, view, regions_per_image=1, pixels_per_region=4, seeds=torch.arange(500))
    assert all(len(set(row.tolist())) == 4 for row in samples.view1_index)
    counts = torch.bincount(samples.view1_index.reshape(-1), minlength=200).double()
    expected = 500 * 4 / 200
    assert (counts - expected).abs().max() < 6 * expected**0.5


def test_region_choice_and_pixel_choice_are_uniform():
    # One image, five shared regions of very different sizes, plus one region seen in view 1 only.
    # Regions are drawn uniformly whatever their size (P = S/5 each); pixels uniformly within a
    # region (P = 1/size). Bounds are ~6 standard deviations.
    view1 = torch.tensor([[[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 3, 4, 5]]])
    view2 = torch.tensor([[[4, 3, 2, 1, 0, -1, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]]])
    draws, regions_per_image, pixels_per_region = 3000, 2, 4
    region_counts = torch.zeros(6)
    pixel_counts = torch.zeros(16)
    for start in range(0, draws, 100):
        samples = sample_region_pixels(
            view1.expand(100, -1, -1), view2.expand(100, -1, -1), regions_per_image=regions_per_image,
            pixels_per_region=pixels_per_region, seeds=torch.arange(start, start + 100),
        )
        region_counts += torch.bincount(slot_ids(samples, pixels_per_region).reshape(-1), minlength=6)
        region_zero = samples.region_ids[:, : regions_per_image * pixels_per_region] == 0
        pixel_counts += torch.bincount(samples.view1_index[region_zero], minlength=16)
    assert region_counts[5] == 0
    frequency = region_counts[:5] / draws
    assert (frequency - regions_per_image / 5).abs().max() < 6 * (0.4 * 0.6 / draws) ** 0.5
    region_zero_pixels = pixel_counts[:8]
    assert pixel_counts[8:].sum() == 0
    share = region_zero_pixels / region_zero_pixels.sum()
    assert (share - 1 / 8).abs().max() < 6 * ((1 / 8) * (7 / 8) / region_zero_pixels.sum()) ** 0.5


def test_gather_embeddings_matches_indexing():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 5, generator=generator)
    flat_index = torch.tensor([[0, 19, 7], [6, 6, 12]])
    gathered = gather_embeddings(features, flat_index)
    assert gathered.shape == (2, 3, 3)
    for b in range(2):
        for k in range(3):
            h, w = divmod(flat_index[b, k].item(), 5)
            assert torch.equal(gathered[b, k], features[b, :, h, w])


def test_region_samples_gather_order():
    view1, view2 = random_region_maps(5, batch=2)
    samples = sample_region_pixels(view1, view2, regions_per_image=3, pixels_per_region=2, seeds=torch.arange(2))
    # Feature = the region id itself, so the gathered embeddings must reproduce region_ids.
    features_view1 = view1.unsqueeze(1).float()
    features_view2 = view2.unsqueeze(1).float()
    gathered = samples.gather(features_view1, features_view2)
    assert gathered.shape == (2, 12, 1)
    valid = samples.region_ids >= 0
    assert torch.equal(gathered[..., 0][valid], samples.region_ids[valid].float())


def test_bad_arguments_raise():
    maps = torch.zeros(2, 4, 4, dtype=torch.long)
    seeds = torch.arange(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="regions_per_image"):
            sample_region_pixels(maps, maps, regions_per_image=bad, pixels_per_region=2, seeds=seeds)
        with pytest.raises(ValueError, match="pixels_per_region"):
            sample_region_pixels(maps, maps, regions_per_image=2, pixels_per_region=bad, seeds=seeds)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(3, 4, 4\)"):
        sample_region_pixels(maps, torch.zeros(3, 4, 4, dtype=torch.long), regions_per_image=2, pixels_per_region=2,
                             seeds=seeds)
    with pytest.raises(ValueError, match=r"seeds \(3,\)"):
        sample_region_pixels(maps, maps, regions_per_image=2, pixels_per_region=2, seeds=torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        sample_region_pixels(maps.float(), maps, regions_per_image=2, pixels_per_region=2, seeds=seeds)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        sample_region_pixels(maps[0], maps, regions_per_image=2, pixels_per_region=2, seeds=seeds)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(3, 5\)"):
        gather_embeddings(torch.zeros(2, 3, 4, 4), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        gather_embeddings(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5))

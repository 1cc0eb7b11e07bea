"""Tests for sslens.evaluate: feature extraction and caching, weighted kNN, linear probe, table."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from sslens.data.base import ImageData, normalize, to_float
from sslens.evaluate import (
    FeatureCache,
    evaluate_encoder,
    extract_features,
    feature_cache_key,
    format_results_table,
    knn_predict,
    knn_top1,
    linear_probe,
)
from sslens.hashing import module_sha256


def make_data(count: int = 20, size: int = 8, seed: int = 0, num_classes: int = 2) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % num_classes
    return ImageData(images, labels, [f"c{i}" for i in range(num_classes)], source=f"random-{seed}")


def make_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


class CountingEncoder(nn.Module):
    """Mean colour per channel; counts the images it has seen."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        return x.mean(dim=(2, 3)) * self.scale


class FailingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


# ---------------------------------------------------------------- extract_features


def test_extract_features_matches_eval_forward_and_restores_train_mode():
    data, encoder = make_data(), make_encoder()
    encoder.train()
    encoder[1].eval()  # a mixed state must come back exactly, not as a blanket .train()
    running_mean = encoder[1].running_mean.clone()

    features = extract_features(encoder, data, batch_size=7)

    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert not features.is_inference()  # usable in autograd by the caller
    assert features.shape == (20, 4)
    assert encoder.training and encoder[0].training and not encoder[1].training
    assert torch.equal(encoder[1].running_mean, running_mean)  # eval mode: BN stats untouched
    reference = copy.deepcopy(encoder).eval()
    with torch.no_grad():
        expected = reference(normalize(to_float(data.images), data.mean, data.std))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_extract_features_does_not_depend_on_batch_size():
    data, encoder = make_data(count=30), make_encoder()
    small = extract_features(encoder, data, batch_size=7)
    large = extract_features(encoder, data, batch_size=64)
    torch.testing.assert_close(small, large, rtol=0, atol=1e-6)


def test_extract_features_restores_mode_when_encoder_raises():
    encoder = FailingEncoder().train()
    encoder.inner.eval()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(encoder, make_data())
    assert encoder.training and not encoder.inner.training


def test_extract_features_rejects_bad_encoder_output_and_arguments():
    data = make_data()
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        extract_features(nn.Identity(), data)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(make_encoder(), data, batch_size=0)
    with pytest.raises(TypeError, match="iter_batches"):
        extract_features(make_encoder(), torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="together"):
        extract_features(make_encoder(), data, cache_key="abc")


def test_cache_skips_the_encoder_on_the_second_call(tmp_path):
    data, encoder, cache = make_data(), CountingEncoder(), FeatureCache(tmp_path / "features")
    key = feature_cache_key(weights=module_sha256(encoder), data=data.source, split="train")

    first = extract_features(encoder, data, batch_size=8, cache=cache, cache_key=key)
    assert encoder.images_seen == 20
    second = extract_features(encoder, data, batch_size=8, cache=cache, cache_key=key)

    assert encoder.images_seen == 20
    assert torch.equal(first, second)
    assert [p.name for p in (tmp_path / "features").iterdir()] == [f"{key}.safetensors"]


def test_cache_rejects_features_that_do_not_fit_the_data(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put("stale", torch.zeros(5, 3))
    with pytest.raises(ValueError, match="does not identify the data"):
        extract_features(CountingEncoder(), make_data(), cache=cache, cache_key="stale")


def test_feature_cache_round_trip_and_safe_keys(tmp_path):
    cache = FeatureCache(tmp_path)
    tensor = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert cache.get("k1") is None and "k1" not in cache
    cache.put("k1", tensor)
    cache.put("k1", tensor * 2)  # replacing is atomic and leaves no temporary file
    assert torch.equal(cache.get("k1"), tensor * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.safetensors"]
    for bad in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="feature_cache_key"):
            cache.put(bad, tensor)


def test_feature_cache_key_is_order_free_and_sensitive_to_every_part():
    key = feature_cache_key(weights="ab", split="train", kind="pooled")
    assert key == feature_cache_key(kind="pooled", split="train", weights="ab")
    assert key != feature_cache_key(weights="ab", split="test", kind="pooled")
    assert key != feature_cache_key(weights="ac", split="train", kind="pooled")
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    with pytest.raises(ValueError):
        feature_cache_key()


def test_module_sha256_follows_the_weights():
    encoder = make_encoder()
    twin = copy.deepcopy(encoder)
    assert module_sha256(encoder) == module_sha256(twin)
    with torch.no_grad():
        twin[0].weight[0, 0, 0, 0] += 1e-3
    assert module_sha256(encoder) != module_sha256(twin)
    assert module_sha256(encoder) != module_sha256(make_encoder(seed=1))


# ---------------------------------------------------------------- weighted kNN


def _close_call_data(scale_query: float = 1.0):
    """One class-0 neighbour at cosine 1, two class-1 neighbours at cosine 0.9 (norms vary)."""
    side = math.sqrt(1 - 0.81)
    train = torch.tensor([[2.0, 0.0], [0.9 * 3, side * 3], [0.9 * 0.5, -side * 0.5]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[scale_query, 0.0]])
    return train, labels, query


def test_knn_scores_match_hand_computed_weights():
    train, labels, query = _close_call_data(scale_query=5.0)
    scores = knn_predict(train, labels, query, num_classes=3, k=3, temperature=0.1)
    # w_0 = exp(1/τ), w_1 = 2·exp(0.9/τ); normalised: w_1/w_0 = 2·exp(-1).
    ratio = 2 * math.exp(-1.0)
    expected = torch.tensor([[1 / (1 + ratio), ratio / (1 + ratio), 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("temperature", "winner"), [(0.01, 0), (0.1, 0), (0.2, 1), (10.0, 1)])
def test_knn_temperature_trades_nearest_against_majority(temperature, winner):
    # Class 0 wins while 1 > 2·exp(-0.1/τ), i.e. τ < 0.1/ln 2 ≈ 0.144.
    train, labels, query = _close_call_data()
    scores = knn_predict(train, labels, query, num_classes=2, k=3, temperature=temperature)
    assert scores.argmax(dim=1).item() == winner


def test_knn_k1_is_the_cosine_nearest_neighbour():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 5, (50,), generator=generator)
    query = torch.randn(30, 8, generator=generator)
    scores = knn_predict(train, labels, query, num_classes=5, k=1)
    cosine = nn.functional.normalize(query, dim=1) @ nn.functional.normalize(train, dim=1).T
    assert torch.equal(scores.argmax(dim=1), labels[cosine.argmax(dim=1)])
    assert torch.equal(scores.max(dim=1).values, torch.ones(30))


def test_knn_k_is_clipped_chunking_is_invisible_and_rows_sum_to_one():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    query = torch.randn(25, 6, generator=generator)
    every = knn_predict(train, labels, query, num_classes=4, k=40, chunk_size=1024)
    clipped = knn_predict(train, labels, query, num_classes=4, k=10_000, chunk_size=3)
    torch.testing.assert_close(every, clipped, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(every.sum(dim=1), torch.ones(25))


def test_knn_high_temperature_is_a_majority_vote_and_low_temperature_stays_finite():
    generator = torch.Generator().manual_seed(2)
    train = torch.randn(30, 5, generator=generator)
    labels = torch.randint(0, 3, (30,), generator=generator)
    query = torch.randn(10, 5, generator=generator)
    votes = knn_predict(train, labels, query, num_classes=3, k=7, temperature=1e6)
    cosine = nn.functional.normalize(query, dim=1) @ nn.functional.normalize(train, dim=1).T
    counts = nn.functional.one_hot(labels[cosine.topk(7, dim=1).indices], 3).sum(dim=1)
    torch.testing.assert_close(votes, counts / 7.0, rtol=1e-4, atol=1e-5)
    sharp = knn_predict(train, labels, query, num_classes=3, k=7, temperature=1e-3)
    assert torch.isfinite(sharp).all()


def test_knn_top1_counts_correct_predictions():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    test = torch.tensor([[3.0, 0.2], [0.1, 2.0], [1.0, 0.1], [1.0, 0.3]])
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 1, 1]), k=1) == 0.5
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0, 0]), k=1) == 1.0


def test_knn_rejects_bad_arguments():
    train, labels, query = _close_call_data()
    with pytest.raises(ValueError, match="k must"):
        knn_predict(train, labels, query, num_classes=2, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, query, num_classes=2, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(train, labels, query, num_classes=1)
    with pytest.raises(ValueError, match="feature dimension"):
        knn_predict(train, labels, torch.zeros(1, 3), num_classes=2)
    with pytest.raises(TypeError, match="integer"):
        knn_predict(train, labels.float(), query, num_classes=2)


# ---------------------------------------------------------------- linear probe


def separable(count: int, seed: int, num_classes: int = 4, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    return centers[labels] + torch.randn(count, dim, generator=generator), labels


def test_linear_probe_solves_a_separable_problem_even_unstandardised():
    (train_x, train_y), (test_x, test_y) = separable(400, 0), separable(300, 1)
    result = linear_probe(
        train_x * 1000 + 50, train_y, test_x * 1000 + 50, test_y, num_classes=4, epochs=20
    )
    assert result.top1 >= 0.95 and result.val_top1 >= 0.95 and result.train_top1 >= 0.95
    assert result.num_val == 40
    json.dumps(result.to_dict())


def test_linear_probe_is_at_chance_with_shuffled_labels():
    (train_x, _), (test_x, _) = separable(400, 0), separable(1000, 1)
    generator = torch.Generator().manual_seed(5)
    train_y = torch.randint(0, 4, (400,), generator=generator)
    test_y = torch.randint(0, 4, (1000,), generator=generator)
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=20)
    assert abs(result.top1 - 0.25) < 0.06


def correlated(count: int, seed: int):
    """x = [s + n, n] + small noise with a shared n ~ N(0, 3²): only w ≈ [1, -1] separates s = ±1.

    A strongly decayed layer points along the class-mean difference [1, 0] and sees mostly n.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    shared = 3 * torch.randn(count, generator=generator)
    x = torch.stack([2.0 * labels - 1 + shared, shared], dim=1)
    return x + 0.1 * torch.randn(count, 2, generator=generator), labels


def test_weight_decay_is_chosen_on_validation_never_on_test():
    (train_x, train_y), (test_x, test_y) = correlated(400, 0), correlated(200, 1)
    shuffled = test_y[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    options = dict(num_classes=2, epochs=20, batch_size=32, weight_decays=(10.0, 0.0), seed=3)
    honest = linear_probe(train_x, train_y, test_x, test_y, **options)
    scrambled = linear_probe(train_x, train_y, test_x, shuffled, **options)

    assert honest.weight_decay == scrambled.weight_decay == 0.0
    assert honest.val_top1 == scrambled.val_top1 == dict(honest.val_top1_by_weight_decay)[0.0]
    assert honest.val_top1_by_weight_decay == scrambled.val_top1_by_weight_decay
    assert dict(honest.val_top1_by_weight_decay)[10.0] < honest.val_top1 - 0.1
    assert honest.top1 >= 0.95 and scrambled.top1 < 0.7


def test_linear_probe_is_seeded():
    (train_x, train_y), (test_x, test_y) = separable(200, 0), separable(100, 1)
    generator = torch.Generator().manual_seed(0)
    noisy_x = train_x + 4 * torch.randn(train_x.shape, generator=generator)
    first = linear_probe(noisy_x, train_y, test_x, test_y, num_classes=4, epochs=5, seed=7)
    again = linear_probe(noisy_x, train_y, test_x, test_y, num_classes=4, epochs=5, seed=7)
    assert first == again


def test_linear_probe_rejects_bad_arguments():
    x, y = separable(50, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, num_classes=4, val_fraction=0.0)
    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(x, y, x, y, num_classes=4, weight_decays=(-1.0,))
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, y, num_classes=3)
    with pytest.raises(ValueError, match="none to fit"):
        linear_probe(x[:1], y[:1], x, y, num_classes=4)


# ---------------------------------------------------------------- evaluate_encoder and table


def colour_data(count: int, seed: int) -> ImageData:
    """Class 0 is reddish, class 1 bluish: a mean-colour encoder separates them perfectly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    base = torch.tensor([[200, 60, 60], [60, 60, 200]], dtype=torch.float32)[labels]
    noise = torch.randint(-40, 40, (count, 4, 4, 3), generator=generator)
    images = (base[:, None, None, :] + noise).clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, ["red", "blue"], source=f"colour-{seed}")


def test_evaluate_encoder_reports_json_serialisable_accuracies(tmp_path):
    train, test, encoder = colour_data(40, 0), colour_data(20, 1), CountingEncoder()
    cache = FeatureCache(tmp_path)
    result = evaluate_encoder(encoder, train, test, k=5, linear_epochs=10, cache=cache)

    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0
    details = result["details"]
    assert (details["k"], details["num_train"], details["num_test"]) == (5, 40, 20)
    assert (details["feature_dim"], details["num_classes"]) == (3, 2)
    assert details["linear"]["weight_decay"] in (0.0, 1e-5, 1e-4, 1e-3)
    assert 0.0 <= details["linear"]["val_top1"] <= 1.0
    assert set(details["seconds"]) == {"features", "knn", "linear", "total"}
    json.dumps(result)

    seen = encoder.images_seen
    again = evaluate_encoder(encoder, train, test, k=500, linear=False, cache=cache)
    assert encoder.images_seen == seen == 60  # second run read both splits from the cache
    assert again["linear_top1"] is None and again["details"]["k"] == 40
    with torch.no_grad():
        encoder.scale[0] = 2.0  # new weights → new cache keys → the encoder runs again
    evaluate_encoder(encoder, train, test, k=5, linear=False, cache=cache)
    assert encoder.images_seen == 120


def test_format_results_table_aligns_percentages():
    table = format_results_table(
        {
            "simclr": {"knn_top1": 0.8125, "linear_top1": 0.9},
            "moco-v2-long-name": {"knn_top1": 0.05, "linear_top1": None},
        }
    )
    assert table.splitlines() == [
        "model              kNN top-1  linear top-1",
        "simclr                 81.2%         90.0%",
        "moco-v2-long-name       5.0%             -",
    ]
    with pytest.raises(ValueError, match="fraction"):
        format_results_table({"simclr": {"knn_top1": 81.2}})
    with pytest.raises(ValueError, match="non-empty"):
        format_results_table({})


def test_streamed_folders_with_other_files_get_other_feature_keys(tmp_path):
    from sslens.data.imagefolder import StreamingImageData
    from sslens.evaluate.quality import _data_identity

    def folder(root, files):
        return StreamingImageData(root, files, torch.zeros(len(files), dtype=torch.long), ["a"], (8, 8), None,
                                  source="imagefolder train")

    key = _data_identity(folder(tmp_path, ["a/1.png", "a/2.png"]))
    assert _data_identity(folder(tmp_path, ["a/1.png", "a/2.png"])) == key
    # Same source text and count: before, these shared one cache entry.
    assert _data_identity(folder(tmp_path, ["a/1.png", "a/3.png"])) != key
    assert _data_identity(folder(tmp_path / "other", ["a/1.png", "a/2.png"])) != key


def test_nearest_neighbours_are_the_most_cosine_similar_other_rows():
    from sslens.evaluate.knn import nearest_neighbours

    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    expected = similarity.argsort(dim=1, descending=True)[:, :4]
    # Chunks smaller than the rows give the same answer; a row is never its own neighbour.
    assert nearest_neighbours(features, 4, chunk_size=7).equal(expected)
    assert not (nearest_neighbours(features, 4) == torch.arange(50)[:, None]).any()
    assert nearest_neighbours(features[:3], 10).shape == (3, 2)  # k clipped to N - 1

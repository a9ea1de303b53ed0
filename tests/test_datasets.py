"""Every dataset layout, built as a tiny tree in its real on-disk form."""
from __future__ import annotations

import os
import pickle
import shutil

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
    only = create_dataset("domainnet", tmp_path, only_domains=["real"])
    assert only.domains == ["real"] and len(only) == 6


def test_domainnet_missing_list_is_named(tmp_path):
    _domainnet_tree(tmp_path)
    (tmp_path / "real_test.txt").unlink()
    with pytest.raises(DatasetError, match="real_test.txt"):
        create_dataset("domainnet", tmp_path)


def test_unknown_domain_lists_domains(tmp_path):
    _domainnet_tree(tmp_path)
    with pytest.raises(DatasetError, match="unknown domain.*clipart, real"):
        create_dataset("domainnet", tmp_path, only_domains=["sketchy"])


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
    with pytest.raises(DatasetError, match=r"cifar-100-python/meta .*refusing to load .*system"):
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


def _cifar_tree(root, **replace):
    """A CIFAR-100 folder whose files are `replace`d (name -> bytes) where given."""
    base = root / "cifar-100-python"
    base.mkdir()
    files = {"train": pickle.dumps(_cifar_batch(5, 0), protocol=2),
             "test": pickle.dumps(_cifar_batch(2, 1), protocol=2),
             "meta": pickle.dumps({b"fine_label_names": [b"apple", b"bear", b"cup"]}, protocol=2)}
    for name, data in (files | replace).items():
        (base / name).write_bytes(data)


@pytest.mark.parametrize("name, data, match", [
    ("meta", pickle.dumps({b"label_names": [b"a"]}), "meta has no fine_label_names entry"),
    ("meta", pickle.dumps({b"fine_label_names": [b"\xff"]}), "meta: fine_label_names is not a list of UTF-8"),
    ("meta", b"not a pickle at all", "meta cannot be read as a CIFAR-100 python pickle"),
    ("train", pickle.dumps(_cifar_batch(5, 0))[:40], "train cannot be read"),  # truncated
    ("train", pickle.dumps([1, 2, 3]), "train has no data, fine_labels entry"),
    ("train", pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4}), "train: expected data"),
    ("test", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 7]}), "test: expected data"),
])
def test_a_wrong_cifar_file_is_one_error_naming_it(tmp_path, name, data, match):
    _cifar_tree(tmp_path, **{name: data})
    with pytest.raises(DatasetError, match=match) as err:
        create_dataset("cifar100", tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / "cifar-100-python" / name) in str(err.value)


@pytest.mark.parametrize("listed", ["../outside/x.jpg", "/etc/hostname", "clipart/../../outside/x.jpg",
                                    "real/zebra/real_001_000000.jpg", "clipart/zebra.jpg"])
def test_a_domainnet_line_naming_a_file_outside_its_domain_is_refused_naming_the_line(tmp_path, listed):
    _domainnet_tree(tmp_path / "data")
    (tmp_path / "outside").mkdir()
    write_image(tmp_path / "outside" / "x.jpg", 1, fmt="JPEG")
    lst = tmp_path / "data" / "clipart_train.txt"
    lst.write_text(lst.read_text() + f"{listed} 1\n")
    with pytest.raises(DatasetError, match=rf"clipart_train.txt:5: '{listed}' is not a file under clipart/<class>/"):
        create_dataset("domainnet", tmp_path / "data")


@pytest.mark.parametrize("line, match", [
    (b"clipart/zebra/clipart_001_000000.jpg 1", r"clipart_train.txt:5: clipart/zebra/\S+ is listed twice \(also "
                                                r"\S+clipart_train.txt:3\)"),
    (b"clipart/zebra/clipart_001_000009.jpg 0", "clipart_train.txt:5: label 0 is class aircraft_carrier elsewhere"),
    (b"clipart/zebra/\xff.jpg 1", "clipart_train.txt:5: not valid UTF-8"),
])
def test_contradicting_domainnet_lines_are_refused_naming_the_line(tmp_path, line, match):
    _domainnet_tree(tmp_path)
    lst = tmp_path / "clipart_train.txt"
    lst.write_bytes(lst.read_bytes() + line + b"\n")
    with pytest.raises(DatasetError, match=match):
        create_dataset("domainnet", tmp_path)


def _bytes_name_or_skip(path: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")


def test_a_file_name_that_is_not_utf8_is_skipped_naming_it_and_a_folder_name_is_refused(tmp_path):
    root = os.fsencode(tmp_path)
    write_image(tmp_path / "cat" / "a.png", 1)
    _bytes_name_or_skip(root + b"/cat/b\xff.png")
    with pytest.warns(UserWarning, match=r"skipping 1 image\(s\) whose file names are not valid UTF-8: cat/b\\xff.png"):
        ds = create_dataset("imagefolder", tmp_path)
    assert [s.key for s in ds.samples] == ["cat/a.png"]
    ds.fingerprint()  # every key is valid text
    _bytes_name_or_skip(root + b"/d\xe9j\xe0/c.png")
    with pytest.raises(DatasetError, match=r"not valid UTF-8 .*: d\\xe9j\\xe0; rename them"):
        create_dataset("imagefolder", tmp_path)


def test_officehome_refuses_a_domain_twice_a_foreign_folder_and_a_stray_image(tmp_path):
    for d in ("Art", "Real World"):
        write_image(tmp_path / d / "Bike" / "00001.jpg", 1, fmt="JPEG")
    write_image(tmp_path / "RealWorld" / "Bike" / "00002.jpg", 1, fmt="JPEG")
    with pytest.raises(DatasetError, match="RealWorld hold images but are not OfficeHome domains.*--domain"):
        create_dataset("officehome", tmp_path)
    assert create_dataset("officehome", tmp_path, only_domains=["Art"]).domains == ["Art"]  # the selection reads Art only
    (tmp_path / "RealWorld").rename(tmp_path / "Real_World")
    with pytest.raises(DatasetError, match="folders Real World, Real_World are the same OfficeHome domain"):
        create_dataset("officehome", tmp_path)
    shutil.rmtree(tmp_path / "Real_World")
    write_image(tmp_path / "Art" / "stray.jpg", 1, fmt="JPEG")
    with pytest.raises(DatasetError, match="1 image.* outside the class folders of root/domain/class/img: Art/stray"):
        create_dataset("officehome", tmp_path)


def test_imagenet_validation_images_outside_class_folders_are_refused(tmp_path):
    write_image(tmp_path / "train" / "n01" / "a.JPEG", 1, fmt="JPEG")
    write_image(tmp_path / "test" / "b.JPEG", 1, fmt="JPEG")  # the official test/ folder is not read
    for i in range(5):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 1, fmt="JPEG")
    with pytest.raises(DatasetError, match=r"5 image\(s\) outside the class folders of root/split/class/img: "
                                           r"val/ILSVRC2012_val_00000000.JPEG, .* \(\+2 more\)"):
        create_dataset("imagenet", tmp_path)


def test_empty_folders_are_ignored_with_a_warning_and_the_layout_is_described(tmp_path):
    for d in ("dA", "dB"):
        write_image(tmp_path / d / "c0" / "a.png", 1)
    (tmp_path / "dC").mkdir()  # an empty domain: not a reason to read the domains as classes
    (tmp_path / "dA" / "c9").mkdir()  # an empty class
    with pytest.warns(UserWarning, match=r"ignoring 2 folder\(s\) without images: dA/c9, dC"):
        ds = create_dataset("imagefolder", tmp_path)
    assert (ds.domains, ds.classes) == (["dA", "dB"], ["c0"])
    assert ds.describe()["layout"] == "domain/class/img"
    assert create_dataset("synthetic", n=4).describe()["layout"] == "generated"


def _labels(per_class_train, per_class_test):
    labels = np.repeat(np.arange(len(per_class_train)), per_class_train)
    test = np.repeat(np.arange(len(per_class_test)), per_class_test)
    splits = np.r_[np.zeros(len(labels)), np.ones(len(test))].astype(np.int8)
    return np.r_[labels, test], splits


@pytest.mark.parametrize("train, match", [([3, 1, 3], "class 1 has only 1 train rows; choose at most 1"),
                                          ([3, 0, 3], "class 1 has no train rows .*--scenario ssl needs")])
def test_ssl_refuses_a_class_with_too_few_or_no_train_rows_alike(train, match):
    from kdcache.scenarios import ScenarioError, make_scenario

    def ssl(labels, splits):
        status, domains = np.ones(len(labels), np.uint8), np.zeros(len(labels), np.int16)
        return make_scenario("ssl", labels, domains, splits, status, ["d"], labels_per_class=2)

    with pytest.raises(ScenarioError, match=rf"--labels-per-class 2: {match}"):
        ssl(*_labels(train, [2, 2, 2]))
    assert ssl(*_labels([3, 2, 3], [2, 2, 2])).counts()["labelled"] == 6

"""Generated folder trees against the imagefolder layout rules.

The invariants: a tree is either read with every image's split, domain and class equal to its folders
(and every image of the tree read), or refused with one DatasetError that names a misplaced image;
a well-formed tree (with empty folders, hidden entries and non-image files anywhere) is always read.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_cli, write_image
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.datasets import SPLIT_NAMES, DatasetError, create_dataset

NAMES = ["a", "B", "c d", "é", "x-1", "0_z"]  # folder names: spaces, accents, none hidden or a split name
SPLITS = [(), ("train",), ("test", "train"), ("test", "train", "val")]
EXTRAS = ["empty", "stray", "hidden_file", "hidden_folder", "text"]


@dataclass
class Tree:
    splits: tuple
    domains: list  # [None] for root/[split/]class/img
    classes: list
    counts: list  # images per (split, domain, class) folder, 0 for an empty class folder
    extras: list  # (kind, where) additions, `where` picks a folder of the well-formed tree
    good: set = field(default_factory=set)  # keys of the images at their place
    stray: set = field(default_factory=set)  # keys of images at another depth

    @property
    def layout(self) -> str:
        return ("split/" if self.splits else "") + ("domain/" if self.domains != [None] else "") + "class/img"


@st.composite
def trees(draw) -> Tree:
    splits = draw(st.sampled_from(SPLITS))
    domains = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)) if draw(st.booleans()) \
        else [None]
    classes = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    n = max(len(splits), 1) * len(domains) * len(classes)
    counts = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    extras = draw(st.lists(st.tuples(st.sampled_from(EXTRAS), st.integers(0, 50)), max_size=4))
    return Tree(splits, domains, classes, counts, extras)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")  # listing never decodes: a few bytes are an image to it


def build(tree: Tree, root: Path) -> None:
    """The well-formed tree, then each extra in one of its folders."""
    folders = [()]
    units = [(s,) for s in tree.splits] or [()]
    slots = [u + ((d,) if d else ()) + (c,) for u in units for d in tree.domains for c in tree.classes]
    for slot, count in zip(slots, tree.counts):
        (root.joinpath(*slot)).mkdir(parents=True, exist_ok=True)
        folders += [slot[:i] for i in range(1, len(slot) + 1) if slot[:i] not in folders]
        for j in range(count):
            _touch(root.joinpath(*slot, f"{j}.png"))
            tree.good.add("/".join(slot + (f"{j}.png",)))
    depth = len(tree.layout.split("/"))
    for k, (kind, where) in enumerate(tree.extras):
        at = folders[where % len(folders)]
        if kind == "empty":
            root.joinpath(*at, f"e{k}").mkdir(exist_ok=True)
        elif kind == "stray":  # an image one level too high, or (in a class folder) one too deep
            rel = at + (f"sub{k}",) * (len(at) == depth - 1) + (f"s{k}.png",)
            _touch(root.joinpath(*rel))
            tree.stray.add("/".join(rel))
        elif kind == "hidden_file":
            _touch(root.joinpath(*at, f".h{k}.png"))
        elif kind == "hidden_folder":
            _touch(root.joinpath(*at, f".cache{k}", "c", "x.png"))
        else:
            root.joinpath(*at, f"notes{k}.txt").write_text("not an image")


def check(tree: Tree) -> str:
    """Build `tree`, read it, assert the invariants; returns "read" or "refused"."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folders without images are named in a warning; not checked here
        root = Path(tmp)
        build(tree, root)
        try:
            ds = create_dataset("imagefolder", root)
        except DatasetError as e:
            msg = str(e)
            assert "\n" not in msg
            if tree.stray:
                assert any(k in msg for k in tree.stray), msg  # names a misplaced image
            else:
                assert not tree.good and "no images found" in msg, msg  # a well-formed tree is read
            return "refused"
    assert not (tree.stray and tree.good), "a misplaced image was read"
    assert {s.key for s in ds.samples} == tree.good | tree.stray  # every image, nothing else
    if tree.good:
        assert ds.layout == tree.layout
    skip = ds.layout.startswith("split/")
    for s in ds.samples:
        parts = s.key.split("/")
        assert len(parts) == len(ds.layout.split("/"))
        assert ds.classes[s.label] == parts[-2]
        assert ds.domains[s.domain] == (parts[skip] if "domain/" in ds.layout else "default")
        assert SPLIT_NAMES[s.split] == (parts[0] if skip else "train")
    keys = [s.key.split("/") for s in ds.samples]
    assert ds.classes == sorted({k[-2] for k in keys})  # no empty folder is a class or a domain
    assert ds.domains == (sorted({k[skip] for k in keys}) if "domain/" in ds.layout else ["default"])
    return "read"


OUTCOMES: dict[str, int] = {}


def _property(examples: int):
    @settings(max_examples=examples, deadline=None)
    @given(trees())
    def run(tree):
        outcome = check(tree)
        OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1

    return run


def test_generated_trees_are_read_as_their_folders_say_or_refused_naming_a_misplaced_image():
    _property(40)()
    print("outcomes:", OUTCOMES)


@pytest.mark.slow
def test_many_generated_trees():
    _property(600)()
    print("outcomes:", OUTCOMES)


@pytest.mark.parametrize("tree, outcome", [
    (Tree(("train",), ["dA", "dB"], ["c0"], [1, 1], [("stray", 2)]), "refused"),  # train/dA/s0.png
    (Tree((), ["dA", "dB"], ["c0"], [1, 1], [("empty", 0)]), "read"),  # an empty domain folder e0
    (Tree((), [None], ["cat", "dog"], [2, 0], [("stray", 1), ("hidden_folder", 0)]), "refused"),  # cat/sub0/s0.png
    (Tree((), [None], ["cat"], [0], [("stray", 1)]), "read"),  # only cat/sub0/s0.png: domain cat, class sub0
])
def test_chosen_trees(tree, outcome):
    assert check(tree) == outcome


def _item_one_tree(root: Path, stray: bool) -> None:
    for d in ("dA", "dB"):
        write_image(root / d / "c0" / "a.png", 1)
    (root / "dC").mkdir()
    if stray:
        write_image(root / "dA" / "stray.png", 2)


def test_cli_refuses_a_stray_image_among_domains_in_one_line_with_exit_2(tmp_path):
    _item_one_tree(tmp_path / "data", stray=True)
    out = tmp_path / "cache"
    proc = run_cli("extract", "--dataset", "imagefolder", "--data-root", tmp_path / "data", "--teacher", "test_vit",
                   "--random-init", "--no-progress", "--out", out, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dA/stray.png" in lines[0], lines
    assert "--domain" in lines[0] and not out.exists()


def test_cli_reads_an_empty_domain_folder_as_no_domain_and_records_the_layout(tmp_path):
    from kdcache.cache.store import CacheStore

    _item_one_tree(tmp_path / "data", stray=False)
    out = tmp_path / "cache"
    run_cli("extract", "--dataset", "imagefolder", "--data-root", tmp_path / "data", "--teacher", "test_vit",
            "--random-init", "--no-progress", "--views", "1", "--workers", "0", "--head", "none", "--out", out)
    store = CacheStore.open(out)  # (one class: extract takes it for features alone, --head none)
    assert store.attrs["dataset"]["domains"] == ["dA", "dB"] and store.attrs["dataset"]["classes"] == ["c0"]
    assert store.attrs["dataset_layout"] == "domain/class/img"
    rows = dict(zip(store.text("keys"), zip(store.array("domains")[:].tolist(), store.array("labels")[:].tolist())))
    assert rows == {"dA/c0/a.png": (0, 0), "dB/c0/a.png": (1, 0)}


def test_symlinked_folders_are_followed_but_not_back_up_the_tree(tmp_path):
    write_image(tmp_path / "elsewhere" / "c0" / "a.png", 1)
    write_image(tmp_path / "data" / "dA" / "c0" / "b.png", 2)
    (tmp_path / "data" / "dB").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data" / "dA" / "c0" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    ds = create_dataset("imagefolder", tmp_path / "data")
    assert [(s.key, ds.domains[s.domain]) for s in ds.samples] == [("dA/c0/b.png", "dA"), ("dB/c0/a.png", "dB")]


def test_class_folders_named_like_splits_are_refused_not_guessed(tmp_path):
    for c in ("cat", "train"):
        write_image(tmp_path / c / "a.png", 1)
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other folders of images: cat"):
        create_dataset("imagefolder", tmp_path)


def test_selected_domains_are_the_only_folders_read(tmp_path):
    _item_one_tree(tmp_path, stray=True)
    ds = create_dataset("imagefolder", tmp_path, only_domains=["dB"])
    assert (ds.domains, [s.key for s in ds.samples]) == (["dB"], ["dB/c0/a.png"])
    with pytest.raises(DatasetError, match="dA/stray.png; move them into a class folder"):
        create_dataset("imagefolder", tmp_path, only_domains=["dA"])

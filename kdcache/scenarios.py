"""Label scenarios chosen at stage two: which rows are labelled, unlabelled and evaluated.

One cache serves them all; a scenario is three boolean masks over the cache rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SCENARIOS = ("uda", "ssl", "supervised")
from .codes import Split, Status

TRAIN, TEST, VAL = Split.TRAIN, Split.TEST, Split.VAL


class ScenarioError(ValueError):
    pass


@dataclass
class Scenario:
    kind: str
    labelled: np.ndarray  # bool [N]
    unlabelled: np.ndarray  # bool [N]
    evaluation: np.ndarray  # bool [N]
    description: str

    def digest(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        for m in (self.labelled, self.unlabelled, self.evaluation):
            h.update(np.packbits(m).tobytes())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return {"labelled": int(self.labelled.sum()), "unlabelled": int(self.unlabelled.sum()),
                "evaluation": int(self.evaluation.sum())}


def _eval_split(splits: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Test split if the rows have one, else val."""
    for s in (TEST, VAL):
        m = candidates & (splits == s)
        if m.any():
            return m
    return np.zeros_like(candidates)


def make_scenario(kind: str, labels: np.ndarray, domains: np.ndarray, splits: np.ndarray, status: np.ndarray,
                  domain_names: list[str], source=(), target=(), labels_per_class: int | None = None,
                  seed: int = 0, closed_set: bool = False) -> Scenario:
    if kind not in SCENARIOS:
        raise ScenarioError(f"unknown --scenario {kind!r}; choose one of: {', '.join(SCENARIOS)}")
    if closed_set and kind != "uda":
        raise ScenarioError("--closed-set applies to --scenario uda only")
    if (source or target) and kind != "uda":
        raise ScenarioError(f"--source / --target apply to --scenario uda only (this is --scenario {kind})")
    if labels_per_class is not None and kind != "ssl":
        raise ScenarioError(f"--labels-per-class applies to --scenario ssl only (this is --scenario {kind})")
    usable = status == Status.DONE
    known = usable & (labels >= 0)
    if kind == "uda":
        if not source or not target:
            raise ScenarioError("--scenario uda needs --source DOMAIN and --target DOMAIN "
                                f"(this cache has: {', '.join(domain_names)})")
        bad = [d for d in (*source, *target) if d not in domain_names]
        if bad:
            raise ScenarioError(f"unknown domain(s) {bad}; this cache has: {', '.join(domain_names)}")
        if set(source) & set(target):
            raise ScenarioError(f"a domain cannot be both source and target: {sorted(set(source) & set(target))}")
        src = np.isin(domains, [domain_names.index(d) for d in source]) & usable
        tgt = np.isin(domains, [domain_names.index(d) for d in target]) & usable
        if closed_set:  # a closed-set benchmark: only target rows of classes the source has
            tgt &= np.isin(labels, np.unique(labels[src & known & (splits == TRAIN)]))
        labelled = src & known & (splits == TRAIN)
        evaluation = _eval_split(splits, tgt) & (labels >= 0)
        if not evaluation.any():  # e.g. OfficeHome: no split, adapt and evaluate on the whole target
            evaluation = tgt & (labels >= 0)
        unlabelled = tgt & ~evaluation if (tgt & ~evaluation).any() else tgt.copy()
        desc = f"uda {'+'.join(source)} -> {'+'.join(target)}{' (closed set)' if closed_set else ''}"
    elif kind == "ssl":
        if not labels_per_class or labels_per_class < 1:
            raise ScenarioError("--scenario ssl needs --labels-per-class N (N >= 1)")
        train = known & (splits == TRAIN)
        rng = np.random.default_rng([seed, labels_per_class])
        labelled = np.zeros_like(train)
        classes = np.unique(labels[known])  # every class the cache has rows of, train rows or not
        counts = {int(c): int((train & (labels == c)).sum()) for c in classes}
        short = min(counts, key=counts.get) if counts else None
        if short is not None and counts[short] == 0:
            raise ScenarioError(f"--labels-per-class {labels_per_class}: class {short} has no train rows (only "
                                "test/val rows), so it cannot have labelled ones; --scenario ssl needs train images "
                                "of every class: add some, or extract without that class")
        if short is not None and counts[short] < labels_per_class:
            raise ScenarioError(f"--labels-per-class {labels_per_class}: class {short} has only {counts[short]} "
                                f"train rows; choose at most {counts[short]}")
        for c in classes:
            rows = np.flatnonzero(train & (labels == c))
            labelled[rng.choice(rows, size=labels_per_class, replace=False)] = True
        unlabelled = usable & (splits == TRAIN) & ~labelled
        evaluation = _eval_split(splits, known)
        desc = f"ssl {labels_per_class} labels/class (seed {seed})"
    else:
        labelled = known & (splits == TRAIN)
        unlabelled = np.zeros_like(labelled)
        evaluation = _eval_split(splits, known)
        desc = "supervised"
    if not labelled.any():
        raise ScenarioError(f"scenario '{desc}' has zero labelled samples; check --source / --labels-per-class")
    if not evaluation.any():
        raise ScenarioError(f"scenario '{desc}' has no evaluation samples (no labelled test/val rows)")
    return Scenario(kind, labelled, unlabelled & ~labelled, evaluation & ~labelled, desc)

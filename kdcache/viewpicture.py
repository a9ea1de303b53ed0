"""A picture of a cache's views (`info --show-views N`): the first N readable rows, each view as replayed at the
teacher's input size (a mixed view beside its partner's view, labelled with lambda or the box), under each
the teacher's top class and its probability from the cached logits ('no head' without logits)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .cache.format import CacheError
from .cache.store import CacheStore
from .codes import Status
from .files import writable, write_atomic
from .images import BadImage, decode_packed
from .options import ConfigError
from .mixing import describe, is_mixed, partner_row, partner_view
from .pack import read_members, shard_name
from .replay import Replayed, replay_shard, stored_views
from .views import apply

CELL_INCHES, DPI = 1.6, 100  # one picture cell; the PNG is (2 V cells) x (N cells) of CELL_INCHES * DPI pixels
MAX_COLUMNS = 16  # cells across: a cache of many views (V up to 1,024) shows its first views, not a 160k-pixel row


def default_picture_path(cache: str | Path) -> Path:
    """Beside the cache folder (`<cache>.views.png`, as `<cache>.extract.yaml`); in the current folder for a cache
    on object storage."""
    text = str(cache).rstrip("/")
    if "://" in text:
        return Path.cwd() / f"{text.rsplit('/', 1)[-1]}.views.png"
    return Path(text).with_name(Path(text).name + ".views.png")


def views_drawn(views: int, mixed: bool) -> int:
    """How many of a row's `views` the picture draws: all that fit in MAX_COLUMNS cells (a mixed view takes two)."""
    return min(views, MAX_COLUMNS // (2 if mixed else 1))


def picture_size(rows: int, views: int, mixed: bool) -> tuple[int, int]:
    """(width, height) in pixels of the picture of `rows` rows of a cache of `views` views (each beside a partner
    column when the cache has mixed views; the first `views_drawn` of them)."""
    cells = (2 if mixed else 1) * views_drawn(views, mixed)
    return int(round(cells * CELL_INCHES * DPI)), int(round(rows * CELL_INCHES * DPI))


def picture_notes(store: CacheStore) -> list[str]:
    """What the picture of this cache leaves out, and why: one line each."""
    notes, views, mixed = [], store.layout.views, store.has("mix")
    if views_drawn(views, mixed) < views:
        notes.append(f"views picture: the first {views_drawn(views, mixed)} of the {views} views of each row "
                     f"(at most {MAX_COLUMNS} pictures across)")
    if store.probe_pending():
        notes.append("views picture: no teacher predictions: the probe head is not fitted yet (it is fitted when "
                     "every shard is done), so the cached logits are placeholders; run the extract command again to "
                     "finish the cache")
    return notes


def _caption(store: CacheStore, logits: dict[int, np.ndarray] | None, row: int, view: int) -> str:
    if logits is None:
        return f"view {view}: " + ("head not fitted yet" if store.probe_pending() else "no head")
    z = torch.from_numpy(logits[row][view].astype(np.float32))
    p = torch.softmax(z, 0)
    top = int(p.argmax())
    return f"view {view}: {store.meta.classes[top]} {float(p[top]):.2f}"


def cached_logits(store: CacheStore, rows: list[int]) -> dict[int, np.ndarray] | None:
    """The shown rows' logits [V, C] as readers take them (sparse ones rebuilt), read over their span only; None
    for a cache without a head, or whose probe head is not fitted yet (its logits are placeholders)."""
    if not (store.has("logits") or store.layout.logits_topk) or store.probe_pending():
        return None
    lo, hi = min(rows), max(rows) + 1
    span = store.read("logits", lo, hi)
    return {r: span[r - lo] for r in rows}


def _rows_shown(store: CacheStore, n: int) -> list[int]:
    done = np.flatnonzero(store.status() == Status.DONE)
    return [int(r) for r in done[:n]]


def _replayed(store: CacheStore, rows: list[int], drawn: int, size: int, interpolation: str) -> dict:
    """(row, view) -> (the view as replayed, the partner's view or None) at the teacher's input size, for the
    first `drawn` views of each row."""
    lay, out = store.layout, {}
    has_mix = store.has("mix")
    for k in sorted({r // lay.shard_size for r in rows}):
        span = lay.rows(k)
        members, _ = read_members(store.images_dir / shard_name(k), span)
        packed = {r: data for r, (ext, data) in members.items() if ext != "bad"}
        views = store.read("views", span.start, span.stop)
        mix = store.read("mix", span.start, span.stop) if has_mix else None
        draws = [(r, v) for r in rows if r in span for v in range(drawn)]
        mix_of = None if mix is None else (lambda r: mix[r - span.start])
        for got in replay_shard(packed, draws, stored_views(views, span.start), [(size, interpolation)],
                                store.meta.image_bound, mix_of, span.start):
            if not isinstance(got, Replayed):
                continue
            partner = None
            record = None if mix is None else mix[got.row - span.start, got.view]
            if record is not None and is_mixed(record):
                try:
                    image = decode_packed(packed[partner_row(record, span.start)], store.meta.image_bound)
                    partner = (apply(image, partner_view(record), size, interpolation), record)
                except (BadImage, KeyError):
                    partner = None
            out[(got.row, got.view)] = (got.images[0], partner)
    return out


def picture_views(store: CacheStore, n: int, path: str | Path) -> Path:
    """Write the picture of the first `n` done rows' views (the first `views_drawn` of each) to `path` (PNG);
    returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows_shown(store, n)
    if not rows:
        raise CacheError(f"--show-views {n}: cache {store.path} has no extracted row to show")
    path = Path(path)
    _check_writable(path)
    per_view = 2 if store.has("mix") else 1  # a partner column with mixed views only
    views = views_drawn(store.layout.views, per_view == 2)
    pre = store.meta.section("teacher")["preprocess"]
    shown = _replayed(store, rows, views, int(pre["input_size"]), pre.get("interpolation", "bicubic"))
    logits = cached_logits(store, rows)
    keys = store.text("keys")
    fig, axes = plt.subplots(len(rows), per_view * views, squeeze=False,
                             figsize=(per_view * views * CELL_INCHES, len(rows) * CELL_INCHES))
    for i, row in enumerate(rows):
        for v in range(views):
            own, partner = axes[i, per_view * v], axes[i, per_view * v + per_view - 1]
            for ax in (own, partner):
                ax.set_axis_off()
            image, mixed = shown.get((row, v), (None, None))
            if image is not None:
                own.imshow(image.permute(1, 2, 0).numpy())
            title = _caption(store, logits, row, v)
            own.set_title(f"{keys[row][-18:]}\n{title}" if v == 0 else title, fontsize=6)
            if mixed is not None:
                pixels, record = mixed
                partner.imshow(pixels.permute(1, 2, 0).numpy())
                first = store.layout.rows(row // store.layout.shard_size).start
                partner.set_title(f"partner row {partner_row(record, first)}\n{describe(record)}", fontsize=5)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.5)
    png = io.BytesIO()
    fig.savefig(png, dpi=DPI, format="png")
    plt.close(fig)
    try:
        write_atomic(path, png.getvalue())
    except OSError as e:
        raise _not_writable(path, e.strerror or str(e)) from None
    return path


def _not_writable(path: Path, why: str) -> ConfigError:
    return ConfigError(f"--show-views: cannot write the picture {path} ({why}); choose where it goes with "
                      "--views-out PATH")


def _check_writable(path: Path) -> None:
    """Refuse, before anything is drawn, a picture path whose folder cannot be made or written (a cache on a
    read-only mount has its default picture path beside it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(path, e.strerror or str(e)) from None
    if not writable(path.parent):
        raise _not_writable(path, "its folder is not writable")

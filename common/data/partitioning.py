"""Cut one labelled manifest into simulated sites, by patient: a natural split, IID, or Dirichlet label skew.

Researchers who hold one dataset build a federation out of it the way FL benchmarks do (Flower
Datasets' ``IidPartitioner`` and ``DirichletPartitioner``), with one difference that matters for
medical images: the unit that is dealt out is the PATIENT, never the image, so no patient's images
end up at two sites.

* ``column``: the value of a manifest column (``hospital``) names each patient's site: a natural
  split such as FLamby's. A patient listed under two values is refused.
* ``iid``: within each class (a patient's majority label, as in ``common.data.patient_split``) the
  patients are shuffled with the seed and dealt round-robin, continuing where the previous class
  stopped, so every site gets the same share of every class and sizes differ by at most one patient.
* ``dirichlet``: each site first receives ``min_patients_per_class`` patients of every class (so
  that every site can be trained and tested on each class); the rest of each class is shared out
  by proportions drawn from Dirichlet(``alpha``) over the sites (small alpha = strong label skew).
  The draw is repeated until every site holds ``min_images_per_site`` images.

:func:`write_partition` writes ``<out>/<site>/manifest.csv`` for each site (every column of the
source, the path made absolute, rows in source order) and ``<out>/partition.json`` (the settings
and each site's images and patients per class). The same source, settings and seed give
byte-identical files, so a split can be inspected, shared and reused as ``[[sites]]``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic_io import atomic_write_text
from common.config import PartitionConfig
from common.data.site_manifest import SiteManifest, load_manifest

logger = logging.getLogger(__name__)

PARTITION_FILE = "partition.json"
MAX_DIRICHLET_DRAWS = 1000


class PartitionError(ValueError):
    """The manifest cannot be cut as asked; the message says why and what to change."""


@dataclass(frozen=True)
class PartitionSite:
    """One site of a partition: its name and the manifest written for it."""

    name: str
    manifest: Path


def site_names(num_sites: int) -> list[str]:
    """``hospital-0`` ... (zero-padded when there are ten or more, so that they sort in order)."""
    width = len(str(num_sites - 1))
    return [f"hospital-{index:0{width}d}" for index in range(num_sites)]


def write_partition(
    source: str | Path,
    config: PartitionConfig,
    class_names: Sequence[str],
    out_dir: str | Path,
) -> list[PartitionSite]:
    """Cut ``source`` (a manifest CSV or class-folder root) as ``config`` says and write one manifest per site.

    Raises ManifestError when the source manifest is wrong and PartitionError when it cannot be cut.
    """
    manifest = load_manifest(source, class_names)
    header, rows = _raw_rows(manifest)
    majority = _majority_labels(manifest)
    if config.by == "column":
        sites = _by_column(manifest, rows, config.column or "")
    else:
        num_sites = int(config.num_sites or 0)
        rng = np.random.default_rng(config.seed)
        strata = _strata(majority)
        if config.by == "iid":
            assigned = _iid(strata, num_sites, rng)
        else:
            images = Counter(entry.patient_id for entry in manifest.entries)
            assigned = _dirichlet(strata, num_sites, rng, config, images, manifest.class_names)
        names = site_names(num_sites)
        sites = {names[site]: patients for site, patients in enumerate(assigned)}
    empty = [name for name, patients in sites.items() if not patients]
    if empty:
        raise PartitionError(
            f"{manifest.source}: site(s) {', '.join(empty)} would receive no patient; lower num_sites "
            f"(there are {len(majority)} patients)"
        )

    out = Path(out_dir)
    written = []
    summary: dict[str, dict[str, object]] = {}
    for name in sorted(sites):
        patients = sites[name]
        chosen = [(entry, row) for entry, row in zip(manifest.entries, rows, strict=True)
                  if entry.patient_id in patients]
        path = out / name / "manifest.csv"
        atomic_write_text(path, _csv_text(header, [row for _, row in chosen]))
        written.append(PartitionSite(name, path))
        images = Counter(manifest.class_names[entry.label] for entry, _ in chosen)
        per_class = Counter(manifest.class_names[majority[p]] for p in patients)
        summary[name] = {
            "images": len(chosen),
            "patients": len(patients),
            "images_per_class": {c: images.get(c, 0) for c in manifest.class_names},
            "patients_per_class": {c: per_class.get(c, 0) for c in manifest.class_names},
        }
    document = {
        "source": str(Path(source).resolve()),
        "settings": json.loads(config.model_dump_json(exclude={"manifest"})),
        "sites": summary,
    }
    atomic_write_text(out / PARTITION_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
    logger.info("%s: %s written to %s", manifest.source, config.describe(), out)
    return written


# ----------------------------------------------------------------------------- the source's rows


def _raw_rows(manifest: SiteManifest) -> tuple[list[str], list[dict[str, str]]]:
    """Every column of every validated entry, in entry order, with the path made absolute."""
    if manifest.source.is_dir():
        header = ["path", "label", "patient_id"]
        return header, [{"path": str(e.path), "label": manifest.class_names[e.label], "patient_id": e.patient_id}
                        for e in manifest.entries]
    text = manifest.source.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    by_line = {offset + 2: {k: (v or "").strip() for k, v in raw.items() if k is not None}
               for offset, raw in enumerate(reader)}
    rows = []
    for entry in manifest.entries:
        row = dict(by_line[entry.row])
        row["path"] = str(entry.path)
        rows.append(row)
    return header, rows


def _csv_text(header: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _majority_labels(manifest: SiteManifest) -> dict[str, int]:
    """Each patient's majority label (ties: the smaller index), the stratum ``patient_split`` uses."""
    labels: dict[str, Counter[int]] = defaultdict(Counter)
    for entry in manifest.entries:
        labels[entry.patient_id][entry.label] += 1
    return {patient: min(counts, key=lambda label: (-counts[label], label)) for patient, counts in labels.items()}


def _strata(majority: dict[str, int]) -> dict[int, list[str]]:
    strata: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(majority):
        strata[majority[patient]].append(patient)
    return dict(sorted(strata.items()))


# ----------------------------------------------------------------------------- the three ways


def _by_column(manifest: SiteManifest, rows: list[dict[str, str]], column: str) -> dict[str, set[str]]:
    if rows and column not in rows[0]:
        raise PartitionError(
            f"{manifest.source}: no column {column!r} (the header has {', '.join(rows[0])}); "
            "set [partition] column to the column that names each image's site"
        )
    site_of: dict[str, str] = {}
    conflicts = 0
    sites: dict[str, set[str]] = defaultdict(set)
    for entry, row in zip(manifest.entries, rows, strict=True):
        value = row.get(column, "")
        if not value:
            raise PartitionError(f"{manifest.source}: row {entry.row}: empty {column!r}; every image needs its site")
        name = _plain(value)
        if site_of.setdefault(entry.patient_id, name) != name:
            conflicts += 1
        sites[name].add(entry.patient_id)
    if conflicts:
        raise PartitionError(
            f"{manifest.source}: {conflicts} image(s) put a patient under a second {column!r} value; a patient "
            "belongs to one site: fix those rows or give those patients different ids"
        )
    return dict(sites)


def _plain(value: str) -> str:
    """A column value as a site name: letters, digits, '-', '_' and '.' kept, anything else becomes '-'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in value.strip())


def _iid(strata: dict[int, list[str]], num_sites: int, rng: np.random.Generator) -> list[set[str]]:
    sites: list[set[str]] = [set() for _ in range(num_sites)]
    turn = 0
    for patients in strata.values():
        for patient in rng.permutation(np.asarray(patients, dtype=object)):
            sites[turn % num_sites].add(str(patient))
            turn += 1
    return sites


def _dirichlet(strata: dict[int, list[str]], num_sites: int, rng: np.random.Generator, config: PartitionConfig,
               images: Counter[str], class_names: Sequence[str]) -> list[set[str]]:
    floor = config.min_patients_per_class
    for label, patients in strata.items():
        if len(patients) < floor * num_sites:
            raise PartitionError(
                f"class {class_names[label]!r} has {len(patients)} patients, fewer than num_sites x "
                f"min_patients_per_class = {num_sites} x {floor}; lower num_sites or min_patients_per_class"
            )
    for _ in range(MAX_DIRICHLET_DRAWS):
        sites: list[set[str]] = [set() for _ in range(num_sites)]
        for patients in strata.values():
            shuffled = [str(p) for p in rng.permutation(np.asarray(patients, dtype=object))]
            for site in range(num_sites):
                sites[site].update(shuffled[site * floor:(site + 1) * floor])
            rest = shuffled[num_sites * floor:]
            shares = rng.dirichlet(np.full(num_sites, config.alpha))
            cuts = (np.cumsum(shares) * len(rest)).astype(int)[:-1]
            for site, part in enumerate(np.split(np.asarray(rest, dtype=object), cuts)):
                sites[site].update(str(p) for p in part)
        if all(sum(images[p] for p in site) >= config.min_images_per_site for site in sites):
            return sites
    raise PartitionError(
        f"no Dirichlet({config.alpha:g}) draw in {MAX_DIRICHLET_DRAWS} gave every one of the {num_sites} sites "
        f"{config.min_images_per_site} images; lower min_images_per_site or num_sites, or raise alpha"
    )


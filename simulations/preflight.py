"""Checks before anything trains: can every site of the simulation be trained and tested on?

For each site: its manifest is validated (``common.data.site_manifest``), every image is read once
(``common.data.data_quality``: unreadable files are counted with their reason), and its readable
images are split by patient exactly as the site will split them (``common.data.patient_split``
with ``[data] test_fraction`` and ``split_seed``). A run is refused, with one line per problem that
names the site and what to change, when a site

* has a manifest that cannot be used (missing file or column, unknown label, ...);
* has no patient of some class among its training patients, or among its test patients (its
  personal head could not learn that class, or its balanced accuracy would not be defined);
* has fewer test patients than ``[data] min_test_patients``;
* has more missing or unreadable images than ``[data] max_unreadable_share`` allows (the site itself
  would refuse to start).

The summary (images, patients and classes per site, the split, unreadable files) is for the
researcher's own screen; it holds counts and file names only, never a patient id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from client.site_settings import SiteSettings
from common.config import FederationConfig
from common.data.data_quality import quality_report
from common.data.patient_split import split_by_patient
from common.data.site_manifest import ManifestError, load_manifest

logger = logging.getLogger(__name__)

SHOWN_UNREADABLE = 3


class PreflightRefused(RuntimeError):
    """At least one site cannot take part as it is; the message lists every problem, by site."""


@dataclass(frozen=True)
class SiteCheck:
    """What the pre-flight found at one site (counts only)."""

    site: str
    images: int = 0
    readable: int = 0
    patients: int = 0
    images_per_class: dict[str, int] = field(default_factory=dict)
    train_patients_per_class: dict[str, int] = field(default_factory=dict)
    test_patients_per_class: dict[str, int] = field(default_factory=dict)
    test_patients: int = 0
    unreadable: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = ()


def check_site(settings: SiteSettings, config: FederationConfig) -> SiteCheck:
    """Validate one site's manifest, read its images once and split it as the site will."""
    name = settings.site_name
    try:
        report = quality_report(settings.manifest, class_names=config.model.class_names,
                                clinical_features=config.model.clinical_features,
                                frame_policy=config.data.frame_policy, decode=True)
        manifest = load_manifest(settings.manifest, config.model.class_names, config.model.clinical_features)
    except ManifestError as exc:
        return SiteCheck(name, problems=(f"site {name!r}: its manifest cannot be used: {exc}",))
    unreadable = {item["file"] for item in report["unreadable"]}
    entries = [e for e in manifest.entries if manifest.display_path(e) not in unreadable]
    classes = manifest.class_names
    problems: list[str] = []
    share = len(report["unreadable"]) / max(1, int(report["num_images"]))
    if share > config.data.max_unreadable_share:
        problems.append(
            f"site {name!r}: {len(report['unreadable'])} of {report['num_images']} images are missing or unreadable "
            f"({share:.0%}, more than [data] max_unreadable_share = {config.data.max_unreadable_share:.0%}); fix or "
            "delete those rows (see the summary), or raise max_unreadable_share"
        )
    train_per_class: dict[str, int] = {c: 0 for c in classes}
    test_per_class: dict[str, int] = {c: 0 for c in classes}
    test_patients = 0
    if len({e.patient_id for e in entries}) < 2:
        problems.append(f"site {name!r}: {len(entries)} readable image(s) from fewer than 2 patients; it needs "
                        "patients to train on and others to test on: add patients or leave the site out")
    else:
        train, test = split_by_patient([e.patient_id for e in entries], [e.label for e in entries],
                                       config.data.test_fraction, config.data.split_seed)
        for indices, per_class in ((train, train_per_class), (test, test_per_class)):
            for label, name_of_class in enumerate(classes):
                per_class[name_of_class] = len({entries[i].patient_id for i in indices if entries[i].label == label})
        test_patients = len({entries[i].patient_id for i in test})
        for side, per_class in (("training", train_per_class), ("test", test_per_class)):
            missing = [c for c, n in per_class.items() if n == 0]
            if missing:
                problems.append(
                    f"site {name!r}: no {' or '.join(map(repr, missing))} patient among its {side} patients "
                    f"({_counts(per_class)}); add patients of that class to its manifest"
                    + (", change [data] test_fraction or split_seed" if sum(per_class.values()) else "")
                    + ", or leave the site out"
                )
        if test_patients < config.data.min_test_patients:
            problems.append(
                f"site {name!r}: {test_patients} test patient(s), fewer than [data] min_test_patients = "
                f"{config.data.min_test_patients}; add patients, raise [data] test_fraction (now "
                f"{config.data.test_fraction:g}), or lower min_test_patients"
            )
    return SiteCheck(
        site=name,
        images=int(report["num_images"]),
        readable=int(report["num_readable"]),
        patients=int(report["num_patients"]),
        images_per_class=dict(report["readable_images_per_class"]),
        train_patients_per_class=train_per_class,
        test_patients_per_class=test_per_class,
        test_patients=test_patients,
        unreadable=tuple((item["file"], item["reason"]) for item in report["unreadable"]),
        problems=tuple(problems),
    )


def check_sites(sites: Mapping[int, SiteSettings], config: FederationConfig) -> list[SiteCheck]:
    """:func:`check_site` for every site, in partition order."""
    return [check_site(settings, config) for _, settings in sorted(sites.items())]


def refuse_unless_ready(checks: list[SiteCheck]) -> None:
    """Raises PreflightRefused listing every problem of every site; returns when there is none."""
    problems = [problem for check in checks for problem in check.problems]
    if problems:
        raise PreflightRefused(
            f"{len(problems)} problem(s) before training; nothing was trained:\n  - " + "\n  - ".join(problems)
        )


def format_checks(checks: list[SiteCheck]) -> str:
    """The data-quality summary per site, one table row each (for the researcher's console)."""
    lines = ["| site | images (readable) | patients | images per class | train / test patients per class "
             "| unreadable |",
             "|---|---|---|---|---|---|"]
    for check in checks:
        if not check.images_per_class:
            lines.append(f"| {check.site} | - | - | - | - | manifest refused |")
            continue
        split = ", ".join(f"{c} {check.train_patients_per_class.get(c, 0)}/{check.test_patients_per_class.get(c, 0)}"
                          for c in check.images_per_class)
        shown = "; ".join(f"{file}: {reason}" for file, reason in check.unreadable[:SHOWN_UNREADABLE])
        more = len(check.unreadable) - SHOWN_UNREADABLE
        unreadable = f"{len(check.unreadable)}" + (f" ({shown}" + (f"; {more} more" if more > 0 else "") + ")"
                                                   if check.unreadable else "")
        lines.append(f"| {check.site} | {check.images} ({check.readable}) | {check.patients} | "
                     f"{_counts(check.images_per_class)} | {split} | {unreadable} |")
    return "\n".join(lines)


def _counts(per_class: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in per_class.items())

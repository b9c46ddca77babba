"""A site's data-quality report, for the site's own admin only.

What it shows: images and patients per class, the class-imbalance ratio, patients whose
images carry different labels, every unreadable file with its reason, and histograms of
modality, manufacturer, image size, photometric interpretation, bit depth and transfer
syntax.

Privacy decision: the report is LOCAL. It may count device categories (modality,
manufacturer) of the site's own data, because the admin needs them to spot a scanner whose
images look different. It never contains patient names, patient ids, dates, institution
names or any other identifying header value, and none of it is logged or sent to the
coordinator: :func:`main` prints it to stdout (and optionally writes JSON), it does not
log it.

CLI: ``python -m common.data.data_quality MANIFEST [--class-names a,b] [--json out.json]``
(wired as ``fedtl-hospital quality-report MANIFEST``; it imports no torch).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.data.dicom_reader import (
    FRAME_POLICIES,
    FramePolicy,
    UnreadableImageError,
    looks_like_dicom,
    read_header_summary,
    read_image,
)
from common.data.site_manifest import ManifestError, load_manifest

logger = logging.getLogger(__name__)


def quality_report(
    manifest_path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    clinical_features: Sequence[str] = (),
    frame_policy: FramePolicy = "middle",
    decode: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Inspect every file of a manifest and summarise it (JSON-serialisable dict).

    decode: also decode the pixels (finds corrupt/truncated files and missing plugins);
        ``False`` reads headers only (fast).
    Raises ManifestError when the manifest itself is wrong.
    """
    manifest = load_manifest(manifest_path, class_names, clinical_features)
    names = manifest.class_names
    histograms: dict[str, Counter[str]] = defaultdict(Counter)
    unreadable: list[dict[str, str]] = []
    patients_of_class: dict[int, set[str]] = defaultdict(set)
    labels_of_patient: dict[str, set[int]] = defaultdict(set)
    readable_per_class: Counter[int] = Counter()

    for entry in tqdm(manifest.entries, desc="checking images", unit="img", disable=not show_progress, leave=False):
        shown = manifest.display_path(entry)
        patients_of_class[entry.label].add(entry.patient_id)
        labels_of_patient[entry.patient_id].add(entry.label)
        try:
            is_dicom = looks_like_dicom(entry.path)
            if is_dicom:
                header = read_header_summary(entry.path)
                histograms["modality"][header.modality] += 1
                histograms["manufacturer"][header.manufacturer] += 1
                histograms["photometric"][header.photometric] += 1
                histograms["bits_stored"][str(header.bits_stored)] += 1
                histograms["transfer_syntax"][header.transfer_syntax] += 1
                histograms["frames"]["multi-frame" if header.frames > 1 else "single frame"] += 1
                size = f"{header.rows}x{header.columns}"
            else:
                histograms["modality"]["non-DICOM image"] += 1
                size = ""
            if decode or not size:
                image = read_image(entry.path, frame_policy)
                size = f"{image.shape[0]}x{image.shape[1]}"
                if image.ndim == 3 and not is_dicom:
                    histograms["photometric"]["RGB (non-DICOM)"] += 1
                elif not is_dicom:
                    histograms["photometric"]["grayscale (non-DICOM)"] += 1
            histograms["image_size"][size] += 1
            readable_per_class[entry.label] += 1
        except UnreadableImageError as exc:
            unreadable.append({"file": shown, "reason": exc.reason})
        except Exception as exc:  # never let one odd file stop the report
            unreadable.append({"file": shown, "reason": f"unexpected {type(exc).__name__} while reading"})

    images_per_class = manifest.class_counts()
    present = [n for n in images_per_class.values() if n > 0]
    imbalance = (max(present) / min(present)) if present else None
    return {
        "manifest": str(manifest.source),
        "num_images": len(manifest),
        "num_readable": len(manifest) - len(unreadable),
        "num_patients": len(labels_of_patient),
        "class_names": list(names),
        "images_per_class": images_per_class,
        "readable_images_per_class": {name: readable_per_class[i] for i, name in enumerate(names)},
        "patients_per_class": {name: len(patients_of_class[i]) for i, name in enumerate(names)},
        "classes_without_images": [name for name, n in images_per_class.items() if n == 0],
        "class_imbalance_ratio": imbalance,
        "patients_with_mixed_labels": sum(1 for labels in labels_of_patient.values() if len(labels) > 1),
        "images_per_patient": _summary(list(Counter(manifest.patient_ids()).values())),
        "unreadable": unreadable,
        "classes_checked": class_names is not None,
        "rare_labels": [] if class_names is not None else _rare_labels(images_per_class),
        "histograms": {key: dict(sorted(counter.items())) for key, counter in sorted(histograms.items())},
        "local_only": True,
    }


def _rare_labels(images_per_label: dict[str, int]) -> list[str]:
    """Labels on a single row, or on under 5% of the most common label's rows: likely typos."""
    largest = max(images_per_label.values(), default=0)
    return [name for name, n in images_per_label.items() if n == 1 or n < 0.05 * largest]


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def format_quality_report(report: dict[str, Any]) -> str:
    """Human-readable text of a :func:`quality_report` dict."""
    lines = [
        f"Data-quality report for {report['manifest']}  (LOCAL ONLY: do not send outside the site)",
        f"  images: {report['num_images']} ({report['num_readable']} readable), patients: {report['num_patients']}",
        "  per class:              images  readable  patients",
    ]
    for name in report["class_names"]:
        lines.append(
            f"    {name:<20} {report['images_per_class'][name]:>7} {report['readable_images_per_class'][name]:>9}"
            f" {report['patients_per_class'][name]:>9}"
        )
    if not report.get("classes_checked", True):
        lines.append("  (labels NOT checked against the federation's classes: pass --class-names normal,finding "
                     "to check them; every label found is listed above as written)")
    for name in report.get("rare_labels", []):
        count = report["images_per_class"][name]
        lines.append(f"  label {name!r} is on only {count} row(s): a typo? fix those rows, or pass --class-names")
    ratio = report["class_imbalance_ratio"]
    lines.append(f"  class imbalance ratio (largest / smallest present class): {ratio:.2f}" if ratio else
                 "  class imbalance ratio: n/a")
    if report["classes_without_images"]:
        lines.append(f"  classes without images at this site: {', '.join(report['classes_without_images'])}")
    if report["patients_with_mixed_labels"]:
        lines.append(f"  patients whose images carry different labels: {report['patients_with_mixed_labels']}")
    per_patient = report["images_per_patient"]
    lines.append(f"  images per patient: min {per_patient['min']}, median {per_patient['median']}, max {per_patient['max']}")
    for key, histogram in report["histograms"].items():
        lines.append(f"  {key.replace('_', ' ')}:")
        for value, count in sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {value:<40} {count:>6}")
    if report["unreadable"]:
        lines.append(f"  unreadable files ({len(report['unreadable'])}):")
        for item in report["unreadable"]:
            lines.append(f"    {item['file']}: {item['reason']}")
    else:
        lines.append("  unreadable files: none")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-hospital quality-report",
        description="Check a site's manifest and images; prints a local-only report.",
    )
    parser.add_argument("manifest", type=Path, help="the site's manifest CSV or class-folder root")
    parser.add_argument("--class-names", default=None, help="comma-separated classes in label order")
    parser.add_argument("--clinical-features", default="", help="comma-separated numeric manifest columns")
    parser.add_argument("--frame-policy", choices=FRAME_POLICIES, default="middle")
    parser.add_argument("--headers-only", action="store_true", help="do not decode pixels (faster)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 unreadable files found, 2 manifest error)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    features = [c.strip() for c in args.clinical_features.split(",") if c.strip()]
    try:
        report = quality_report(
            args.manifest,
            class_names=class_names,
            clinical_features=features,
            frame_policy=args.frame_policy,
            decode=not args.headers_only,
            show_progress=True,
        )
    except ManifestError as exc:
        print(f"manifest error: {exc}", file=sys.stderr)
        return 2
    print(format_quality_report(report))
    if args.json:
        from common.atomic_io import atomic_write_json

        atomic_write_json(args.json, report)
    return 1 if report["unreadable"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fedtl-hospital predict`` and ``fedtl-hospital export``: the command lines of :mod:`client.inference`.

    fedtl-hospital predict --state-dir S INPUT [--out predictions.csv] [--saliency DIR] [--device auto]
    fedtl-hospital export --state-dir S --out model/

Both run on the site's machine only and open no network connection. Exit codes: 0 done, 2 the
state directory or the input can not be used (the message says why and what to do).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-hospital predict",
        description="Predict with this site's model on new studies; writes one CSV row per image. Nothing is sent.")
    parser.add_argument("input", type=Path, help="a DICOM (or PNG/JPEG) file, a folder of them, or a manifest CSV "
                        "with a 'path' column")
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state directory")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default %(default)s)")
    parser.add_argument("--saliency", type=Path, default=None, metavar="DIR",
                        help="also write a Grad-CAM overlay PNG per image into DIR")
    parser.add_argument("--saliency-stage", default="auto",
                        help="trunk stage Grad-CAM explains (default: the deepest with a map of at least 7x7)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-hospital export",
        description="Write this site's model as a TorchScript file plus its model card (JSON and Markdown).")
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state directory")
    parser.add_argument("--out", required=True, type=Path, help="folder for model.pt, model_card.json, model_card.md")
    return parser


def predict_main(argv: Sequence[str]) -> int:
    args = predict_parser().parse_args(list(argv))
    _quiet_logging()
    from client.inference.predict import PredictInputError, discover_inputs, run_predictions, summary, \
        write_predictions_csv
    from client.inference.site_model import load_site_model
    from client.inference.site_model_record import SiteModelError

    try:
        site_model = load_site_model(args.state_dir, device=args.device)
        inputs = discover_inputs(args.input, site_model.clinical_features)
    except (SiteModelError, PredictInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = run_predictions(site_model, inputs, batch_size=args.batch_size, progress=not args.no_progress,
                          saliency_dir=args.saliency, saliency_stage=args.saliency_stage)
    csv_path = write_predictions_csv(args.out, run.predictions, site_model)
    print(summary(run, site_model, csv_path))
    if args.saliency is not None:
        print(f"saliency       {args.saliency} (one overlay PNG per predicted image)")
    return 0


def export_main(argv: Sequence[str]) -> int:
    args = export_parser().parse_args(list(argv))
    _quiet_logging()
    from client.inference.model_card import build_card, write_card
    from client.inference.model_export import MODEL_FILE, export_torchscript
    from client.inference.site_model import load_site_model
    from client.inference.site_model_record import SiteModelError

    try:
        site_model = load_site_model(args.state_dir, device="cpu")
    except SiteModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    card = build_card(site_model, args.state_dir, MODEL_FILE)
    model_path = export_torchscript(site_model, args.out / MODEL_FILE, card)
    json_path, markdown_path = write_card(card, args.out)
    print(f"model          {model_path} (TorchScript: preprocessed images -> probabilities)")
    print(f"model card     {json_path}, {markdown_path}")
    print(f"decision       {site_model.operating_point.describe()}")
    return 0


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

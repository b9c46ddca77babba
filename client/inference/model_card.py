"""The site model's card: what the exported file is, where it came from, how good it is, what privacy it cost.

Written as JSON (for machines; also stored inside the exported TorchScript file) and Markdown (for
the people who approve its use). Fields: architecture and input/output contract, backbone fingerprint
and source, global-layers id and the last round the site trained, classes, the exact preprocessing,
the operating point with its validation sensitivity/specificity, the site's test metrics with their
95% patient-bootstrap interval, and the privacy spent (unit, epsilon, delta) from the site's ledger.
Everything in it is the site's own business; nothing is sent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from client.inference.site_model import SiteModel
from common.data.decoded_image_cache import QUANT
from common.data.dicom_reader import PERCENTILE_WINDOW, READER_VERSION
from common.models.layer_policy import resolve_policy

CARD_FORMAT_VERSION = 1
LEDGER_FILE = "ledger.json"


def privacy_spent(state_dir: Path, privacy_enabled: bool) -> dict[str, Any]:
    """Unit, epsilon and delta spent, read from a private copy of the site's ledger (never written)."""
    path = state_dir / LEDGER_FILE
    if not privacy_enabled:
        return {"enabled": False, "unit": None, "epsilon": None, "delta": None,
                "note": "DP was off in this federation: the shared-layer updates carried no privacy guarantee"}
    if not path.exists():
        return {"enabled": True, "unit": None, "epsilon": 0.0, "delta": None,
                "note": f"{path} does not exist: the site never trained a private round"}
    from client.privacy.privacy_budget import PrivacyLedger  # Opacus: only when there is a ledger

    with tempfile.TemporaryDirectory(prefix="fedtl-card-") as scratch:
        copy = Path(scratch) / LEDGER_FILE
        shutil.copyfile(path, copy)
        ledger = PrivacyLedger.load(copy)
        return {"enabled": True, "unit": str(getattr(ledger, "unit", "image")), "epsilon": float(ledger.spent_epsilon()),
                "delta": float(ledger.delta), "target_epsilon": float(ledger.target_epsilon),
                "accountant": str(ledger.accountant_kind)}


def build_card(site_model: SiteModel, state_dir: Path, model_file: str | None) -> dict[str, Any]:
    """The card as a JSON-ready dict."""
    config = site_model.config
    preprocessing = site_model.preprocessing
    num_clinical = site_model.classifier.num_clinical
    shape = f"float32 (N, {config.model.in_channels}, {config.model.image_size}, {config.model.image_size})"
    return {
        "format_version": CARD_FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "file": model_file,
            "format": "TorchScript (torch.jit.load)",
            "architecture": config.model.architecture,
            "personal_head": site_model.record.get("head"),
            "personal_layers": site_model.personal_layers,
            "shared_layers": list(resolve_policy(config.policy, config.model.architecture).shared),
            "inputs": [f"images: preprocessed, {shape}"]
            + ([f"clinical: float32 (N, {num_clinical}) = {', '.join(config.model.clinical_features)}"]
               if num_clinical else []),
            "output": f"class probabilities, float32 (N, {config.model.num_classes}), in the order of 'classes'",
        },
        "backbone": {"fingerprint": site_model.backbone_fingerprint, "source": site_model.backbone_source},
        "global_layers": {"id": site_model.global_id, "last_trained_round": site_model.last_trained_round},
        "classes": list(site_model.class_names),
        "preprocessing": {
            "reader": f"fedtl common.data.dicom_reader v{READER_VERSION}: one frame ({config.data.frame_policy}), "
                      "modality LUT, VOI LUT or first window (else the "
                      f"{PERCENTILE_WINDOW[0]}-{PERCENTILE_WINDOW[1]} percentile window), MONOCHROME1 inverted, [0, 1]",
            "geometry": f"longer side resized to {preprocessing.image_size} px (bilinear, antialiased), the shorter "
                        "padded symmetrically with 0 to a square",
            "channels": preprocessing.in_channels,
            "quantisation": f"values rounded to steps of 1/{int(QUANT)}",
            "normalisation": {"mean": list(preprocessing.mean), "std": list(preprocessing.std),
                              "formula": "(x - mean) / std per channel"},
            "key": preprocessing.key(),
        },
        "operating_point": site_model.operating_point.to_dict(),
        "test_metrics": site_model.test_metrics,
        "privacy": privacy_spent(state_dir, config.privacy.enabled),
        "federation": config.name,
    }


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def card_markdown(card: dict[str, Any]) -> str:
    """The card for people."""
    model, point, metrics, privacy = card["model"], card["operating_point"], card["test_metrics"], card["privacy"]
    lines = [
        f"# Model card: {card['federation']} site model ({model['architecture']})",
        "",
        f"- file: `{model['file']}` ({model['format']}); inputs: " + "; ".join(model["inputs"]),
        f"- output: {model['output']}",
        f"- classes: {', '.join(card['classes'])}",
        f"- backbone: {card['backbone']['source']} (fingerprint `{card['backbone']['fingerprint']}`)",
        f"- global shared layers: `{card['global_layers']['id']}` (last round this site trained: "
        f"{card['global_layers']['last_trained_round']}); head: {model['personal_head']} on the "
        f"{model.get('personal_layers', 'global')} shared layers",
        "",
        "## Preprocessing (apply exactly this before the model)",
        "",
        *(f"- {key}: {value}" for key, value in card["preprocessing"].items() if key != "normalisation"),
        f"- normalisation: mean {card['preprocessing']['normalisation']['mean']}, std "
        f"{card['preprocessing']['normalisation']['std']}, (x - mean) / std",
        "",
        "## Decision rule",
        "",
    ]
    if point.get("threshold") is None:
        lines.append(f"- the most probable class ({point.get('note') or 'argmax'})")
    else:
        target = f" >= {point['target']:g}" if point.get("target") is not None else ""
        lines += [f"- positive ({point['positive_class']}) when its probability is >= {point['threshold']:.4f} "
                  f"(rule: {point['rule']}{target})",
                  f"- on the site's validation patients ({point['validation_patients']} patients, "
                  f"{point['validation_images']} images, out-of-fold): sensitivity {_number(point['sensitivity'])}, "
                  f"specificity {_number(point['specificity'])}"]
    lines += ["", "## Test metrics (this site's held-out test patients; argmax decisions)", ""]
    if metrics:
        lines += [f"- balanced accuracy {_number(metrics.get('balanced_accuracy'))} (95% patient-bootstrap interval "
                  f"{_number(metrics.get('ci_low'))} to {_number(metrics.get('ci_high'))}, "
                  f"{int(metrics.get('test_patients', 0))} patients, {int(metrics.get('num_examples', 0))} images)",
                  f"- AUC {_number(metrics.get('auc'))}, sensitivity {_number(metrics.get('sensitivity'))}, "
                  f"specificity {_number(metrics.get('specificity'))}, accuracy {_number(metrics.get('accuracy'))}"]
    else:
        lines.append("- not measured yet (the site records them when it evaluates on its test patients)")
    lines += ["", "## Privacy spent", ""]
    if privacy.get("enabled") and privacy.get("delta") is not None:
        lines.append(f"- ({privacy['epsilon']:.3f}, {privacy['delta']:.3g})-differential privacy per "
                     f"{privacy['unit']} of this site's training data, over the whole federation (target epsilon "
                     f"{privacy.get('target_epsilon')}, {privacy.get('accountant')} accountant)")
        lines.append("- covers what the shared-layer updates revealed; the personal head was fitted without DP and "
                     "never left the site, so this file itself carries no DP guarantee for the site's training data")
    else:
        lines.append(f"- {privacy.get('note')}")
    return "\n".join(lines) + "\n"


def write_card(card: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``model_card.json`` and ``model_card.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "model_card.json", out_dir / "model_card.md"
    json_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    markdown_path.write_text(card_markdown(card), encoding="utf-8")
    return json_path, markdown_path

"""What crosses a site boundary: the only record names and keys a message may carry.

This module is the written contract. The client builds replies from these names, the server
validates replies against them, and the privacy tests fail on anything else.

Coordinator -> site
  train      : ArrayRecord SHARED (the global shared layers), ConfigRecord CONFIG
  evaluate   : ArrayRecord SHARED, ConfigRecord CONFIG
  query      : (backbone install) ArrayRecord BACKBONE (frozen + initial shared tensors), ConfigRecord CONFIG

Site -> coordinator
  train      : ArrayRecord SHARED (trained shared layers, maybe encoded), optional ArrayRecord SHARED_SCALE
               (int8 encoding only), MetricRecord METRICS (TRAIN_METRIC_KEYS), ConfigRecord STATUS
  evaluate   : MetricRecord METRICS (EVALUATE_METRIC_KEYS), ConfigRecord STATUS
  query      : ConfigRecord STATUS

Never: local-head tensors, images or anything computed per image, DICOM header values,
patient ids, file names.
"""

from __future__ import annotations

from typing import Final

# Record names
SHARED: Final = "shared"
SHARED_SCALE: Final = "shared-scale"
BACKBONE: Final = "backbone"
CONFIG: Final = "config"
METRICS: Final = "metrics"
STATUS: Final = "status"

# Message types (Flower message_type strings)
TRAIN: Final = "train"
EVALUATE: Final = "evaluate"
INSTALL_BACKBONE: Final = "query"

# ConfigRecord keys sent by the coordinator
CONFIG_FEDERATION: Final = "fedtl-config"  # FederationConfig as JSON
CONFIG_ROUND: Final = "server-round"
CONFIG_FINGERPRINT: Final = "backbone-fingerprint"
CONFIG_ENCODING: Final = "update-encoding"
CONFIG_PROXIMAL_MU: Final = "proximal-mu"

# STATUS record
STATUS_KEY: Final = "status"
STATUS_FINGERPRINT: Final = "backbone-fingerprint"
STATUS_SITE_NAME: Final = "site-name"  # the name the hospital admin gave the node, never derived from data
STATUS_OK: Final = "ok"
STATUS_DECLINED_BUDGET: Final = "declined-budget"
STATUS_NEED_BACKBONE: Final = "need-backbone"
STATUS_FAILED: Final = "failed"
STATUS_VALUES: Final = frozenset({STATUS_OK, STATUS_DECLINED_BUDGET, STATUS_NEED_BACKBONE, STATUS_FAILED})

# METRICS keys
NUM_EXAMPLES: Final = "num-examples"
TRAIN_METRIC_KEYS: Final = frozenset({NUM_EXAMPLES, "train-loss", "epsilon", "delta"})
EVALUATE_METRIC_KEYS: Final = frozenset(
    {
        NUM_EXAMPLES,
        "loss",
        "accuracy",
        "balanced-accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "epsilon",
        "delta",
    }
)

# Which records each reply may carry.
TRAIN_REPLY_RECORDS: Final = frozenset({SHARED, SHARED_SCALE, METRICS, STATUS})
EVALUATE_REPLY_RECORDS: Final = frozenset({METRICS, STATUS})
INSTALL_REPLY_RECORDS: Final = frozenset({STATUS})

"""What crosses a site boundary: the only record names and keys a message may carry.

This module is the written contract. The client builds replies from these names, the server
validates replies against them, and the privacy tests fail on anything else.

Coordinator -> site
  train      : ConfigRecord CONFIG, and when the site does not yet hold the round's global shared
               layers (CONFIG_GLOBAL_ID): ArrayRecord SHARED (full float32 weights when
               CONFIG_GLOBAL_BASE is "", else an fp16/int8 delta from the copy the site holds) and,
               for int8, ArrayRecord SHARED_SCALE (see ``common.wire.global_sync``)
  evaluate   : the same as train
  query      : (backbone install) ArrayRecord BACKBONE (frozen + initial shared tensors), ConfigRecord CONFIG
               (CONFIG_FINGERPRINT, CONFIG_NORMALIZATION_MEAN, CONFIG_NORMALIZATION_STD, CONFIG_BACKBONE_SOURCE)

Site -> coordinator
  train      : ArrayRecord SHARED (trained shared layers, maybe encoded), optional ArrayRecord SHARED_SCALE
               (int8 encoding only), MetricRecord METRICS (TRAIN_METRIC_KEYS), ConfigRecord STATUS
  evaluate   : MetricRecord METRICS (EVALUATE_METRIC_KEYS), ConfigRecord STATUS
  query      : ConfigRecord STATUS
  every reply's STATUS may carry STATUS_GLOBAL_ID: the id of the coordinator's global layers the
  site holds (a SHA-256 of tensors the coordinator itself sent; nothing about the site's data)

Never: local-head or personal-head tensors, images or anything computed per image, DICOM header
values, patient ids, file names, an exception's text (a failing handler answers STATUS_FAILED only).
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
CONFIG_GLOBAL_ID: Final = "global-id"  # id of the global shared layers the site must train/evaluate
CONFIG_GLOBAL_BASE: Final = "global-base-id"  # id the SHARED delta applies to; "" = full weights
# ConfigRecord keys of the backbone install (query) message: the image normalisation the backbone was
# trained with and a description of where it came from (no site data in either)
CONFIG_NORMALIZATION_MEAN: Final = "normalization-mean"
CONFIG_NORMALIZATION_STD: Final = "normalization-std"
CONFIG_BACKBONE_SOURCE: Final = "backbone-source"

# STATUS record
STATUS_KEY: Final = "status"
STATUS_FINGERPRINT: Final = "backbone-fingerprint"
STATUS_SITE_NAME: Final = "site-name"  # the name the hospital admin gave the node, never derived from data
STATUS_OK: Final = "ok"
STATUS_DECLINED_BUDGET: Final = "declined-budget"
STATUS_NEED_BACKBONE: Final = "need-backbone"
STATUS_NEED_GLOBAL: Final = "need-global"  # the site's copy does not match the delta's base: send full weights
STATUS_FAILED: Final = "failed"
STATUS_VALUES: Final = frozenset(
    {STATUS_OK, STATUS_DECLINED_BUDGET, STATUS_NEED_BACKBONE, STATUS_NEED_GLOBAL, STATUS_FAILED}
)
STATUS_GLOBAL_ID: Final = "global-id"  # the global layers the site holds after this message

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

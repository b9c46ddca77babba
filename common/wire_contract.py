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

Site -> coordinator (every field with its privacy status in OUTBOUND_FIELDS)
  train      : ArrayRecord SHARED (trained shared layers, maybe encoded), optional ArrayRecord SHARED_SCALE
               (int8 encoding only), MetricRecord METRICS (TRAIN_METRIC_KEYS, plus TRAIN_LOSS without DP),
               ConfigRecord STATUS
  evaluate   : MetricRecord METRICS (EVALUATE_REQUIRED_KEYS, plus all of EVALUATION_RESULT_KEYS unless the
               site's evaluation-metrics setting is "none"), ConfigRecord STATUS
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
TRAIN_LOSS: Final = "train-loss"
BUDGET_METRIC_KEYS: Final = frozenset({"epsilon", "delta"})
TRAIN_METRIC_KEYS: Final = frozenset({NUM_EXAMPLES, *BUDGET_METRIC_KEYS})  # every train reply
TRAIN_METRIC_OPTIONAL_KEYS: Final = frozenset({TRAIN_LOSS})  # only when the federation trains without DP
EVALUATION_RESULT_KEYS: Final = frozenset(
    {"loss", "accuracy", "balanced-accuracy", "auc", "sensitivity", "specificity"}
)
EVALUATE_REQUIRED_KEYS: Final = frozenset({NUM_EXAMPLES, *BUDGET_METRIC_KEYS})
EVALUATE_METRIC_KEYS: Final = EVALUATE_REQUIRED_KEYS | EVALUATION_RESULT_KEYS  # all or none of the results

# A site's choice (node config ``evaluation-metrics``) of how its test results leave it.
EVALUATION_METRICS_EXACT: Final = "exact"
EVALUATION_METRICS_ROUNDED: Final = "rounded"  # to EVALUATION_METRICS_DECIMALS decimals
EVALUATION_METRICS_NONE: Final = "none"  # no EVALUATION_RESULT_KEYS at all
EVALUATION_METRICS_SETTINGS: Final = (EVALUATION_METRICS_EXACT, EVALUATION_METRICS_ROUNDED, EVALUATION_METRICS_NONE)
EVALUATION_METRICS_DECIMALS: Final = 2

# ---------------------------------------------------------------------------------------------
# Every field a site sends, with its status: "dp" (covered by the site's DP guarantee, at the
# unit of privacy.unit) or "exact" (not covered; declared here with what it reveals).
DP: Final = "dp"
EXACT: Final = "exact"
OUTBOUND_FIELDS: Final[dict[str, tuple[str, str]]] = {
    f"{SHARED}": (DP, "the trained shared layers; DP-SGD output (exact, and not private, when privacy.enabled "
                      "is false)"),
    f"{SHARED_SCALE}": (DP, "int8 scales of that update: post-processing of the DP output"),
    f"{METRICS}.{NUM_EXAMPLES}": (EXACT, "number of training images (train reply; the aggregation weight) or of "
                                         "test images (evaluate reply)"),
    f"{METRICS}.epsilon": (EXACT, "cumulative epsilon spent: a function of the noise, the sample rate 1/ceil(n/B) "
                                  "and the steps, so it reveals the training-set size to within a batch"),
    f"{METRICS}.delta": (EXACT, "the site's delta: min(1e-5, 1/n^1.1) unless configured, i.e. 1e-5 for every "
                                "site under about 35,000 training patients; above that it reveals n"),
    f"{METRICS}.{TRAIN_LOSS}": (EXACT, "mean training loss of the round; sent only when DP is off (under DP it "
                                       "would be an unprotected statistic of the training data)"),
    **{f"{METRICS}.{key}": (EXACT, "test-set result on the site's held-out patients, exact, rounded to "
                                   f"{EVALUATION_METRICS_DECIMALS} decimals, or not sent, as the site chooses "
                                   "(node config evaluation-metrics)")
       for key in sorted(EVALUATION_RESULT_KEYS)},
    f"{STATUS}.{STATUS_KEY}": (EXACT, "one of STATUS_VALUES: what the site did with the message"),
    f"{STATUS}.{STATUS_FINGERPRINT}": (EXACT, "fingerprint of the backbone the site holds (the coordinator's own)"),
    f"{STATUS}.{STATUS_SITE_NAME}": (EXACT, "the name the hospital's admin gave the node"),
    f"{STATUS}.{STATUS_GLOBAL_ID}": (EXACT, "id of the coordinator's global layers the site holds"),
}

# Which records each reply may carry.
TRAIN_REPLY_RECORDS: Final = frozenset({SHARED, SHARED_SCALE, METRICS, STATUS})
EVALUATE_REPLY_RECORDS: Final = frozenset({METRICS, STATUS})
INSTALL_REPLY_RECORDS: Final = frozenset({STATUS})

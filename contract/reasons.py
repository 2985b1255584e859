"""The words of an InferencePolicy's status conditions and Events, declared once.

Users look these up (`kubectl describe`, alert rules, `batchpilot explain`,
docs/status-and-events.md and docs/troubleshooting.md, which a test holds to
these enums), so each is a `StrEnum`: the member is the exact string written
to the API server, and code can only name a reason that exists here.

A reason can be both a condition's and an Event's (`ActuationFailed`,
`MetricsUnavailable`, `InvalidSpec`): the condition says the state, the
Warning Event the moment it began. The two enums keep them apart because
their readers differ; the strings are equal on purpose.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    """The policy's conditions, in the order the status lists them."""

    READY = "Ready"
    METRICS_AVAILABLE = "MetricsAvailable"
    MODEL_TRUSTED = "ModelTrusted"
    SLO_MET = "SLOMet"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionReason(StrEnum):
    """Every reason a condition can carry."""

    # Why a cycle ran no control step: Ready=False and Degraded=True carry it,
    # and the operator's errors metric counts it.
    INVALID_SPEC = "InvalidSpec"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    NO_PODS_SELECTED = "NoPodsSelected"
    NO_READY_PODS = "NoReadyPods"
    TARGET_NOT_FOUND = "TargetNotFound"
    # Ready: the step ran, in this mode.
    MODE_OFF = "ModeOff"
    MODE_RECOMMEND = "ModeRecommend"
    MODE_AUTO = "ModeAuto"
    # Ready=False (no pod took the settings), Degraded=True (some did not).
    ACTUATION_FAILED = "ActuationFailed"
    # MetricsAvailable, and SLOMet when it could not be judged.
    FRESH = "Fresh"
    QUERY_FAILED = "QueryFailed"
    MISSING_OR_STALE = "MissingOrStale"
    NO_STEP = "NoStep"
    # ModelTrusted.
    HELD_OUT_ERROR_LOW = "HeldOutErrorLow"
    FEEDBACK_RULE = "FeedbackRule"
    # SLOMet.
    WITHIN_OBJECTIVES = "WithinObjectives"
    OBJECTIVES_MISSED = "ObjectivesMissed"
    NO_COMPLETED_REQUESTS = "NoCompletedRequests"
    # Progressing.
    ROLLING_OUT = "RollingOut"
    CANARY = "Canary"
    STABLE = "Stable"
    # Degraded.
    PODS_NOT_REPORTING = "PodsNotReporting"
    HEALTHY = "Healthy"


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class EventReason(StrEnum):
    """Every reason of an Event the operator posts on a policy."""

    # Normal.
    SETTINGS_APPLIED = "SettingsApplied"
    SETTINGS_RESTORED = "SettingsRestored"
    MODE_CHANGED = "ModeChanged"
    # Warning, each time it happens.
    ROLLED_BACK = "RolledBack"
    RESTORE_FAILED = "RestoreFailed"
    # Warning, once per episode: again only when its message changes.
    ACTUATION_FAILED = "ActuationFailed"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    TOKEN_UNAVAILABLE = "TokenUnavailable"
    INVALID_SPEC = "InvalidSpec"

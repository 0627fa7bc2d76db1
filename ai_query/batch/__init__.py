"""The batch pipeline, one module per stage, in the order rows flow through them.

=================  ==========================================================================
``request``        [plan] a request's identity, computed once: ``RequestKey`` (dedup, the
                   journal) and the prompt text (prefix order, the traffic split)
``plan``           [plan] rows grouped by endpoint and parameters, dedup, prefix order
``answers``        [plan] the stage's answer cache: identical requests of later batches share
``journal``        [plan] answers a killed run already received, replayed instead of re-sent
``scheduler``      [fan out] the window scheduler: rows start in dispatch order, a window at a time
(``ai_query._client``) [fan out] the endpoint exchange: route -> admit -> send -> classify -> retry
``results``        [collect] ``CallResult``, the exactly-once check
``pipeline``       the entry: ``start_rows`` runs the stages for one batch; ``shared_client``
=================  ==========================================================================

``pipeline`` drives the client, which itself uses the stages above it, so it is imported on its
own (``from ai_query.batch.pipeline import start_rows``) rather than from this package.
"""

from .answers import StageAnswers, stage_answers
from .journal import JOURNAL_PROPERTY, ResponseJournal, read_entries, replay
from .plan import MODES, GroupPlan, RowGroup, group_rows, mean_shared_prefix, plan_group, prefix_order
from .request import RequestKey, canonical_json, prompt_text_of, request_key, traffic_point
from .results import CallResult, check_exactly_once, shared_copy, without_gaps
from .scheduler import WindowScheduler, window_size

__all__ = [
    "JOURNAL_PROPERTY",
    "MODES",
    "CallResult",
    "GroupPlan",
    "RequestKey",
    "ResponseJournal",
    "RowGroup",
    "StageAnswers",
    "WindowScheduler",
    "canonical_json",
    "check_exactly_once",
    "group_rows",
    "mean_shared_prefix",
    "plan_group",
    "prefix_order",
    "prompt_text_of",
    "read_entries",
    "replay",
    "request_key",
    "shared_copy",
    "stage_answers",
    "traffic_point",
    "window_size",
    "without_gaps",
]

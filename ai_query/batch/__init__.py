"""The batch pipeline, one module per stage, in the order rows flow through them.

Plan:
  ``request``    a request's identity, computed once: ``RequestKey`` (dedup, the journal) and
                 the prompt text (prefix order, the traffic split)
  ``plan``       rows grouped by endpoint and parameters, dedup, prefix order
  ``answers``    the stage's answer cache: identical requests of later batches share an answer
  ``journal``    answers a killed run already received, replayed instead of sent again
Fan out:
  ``scheduler``  the window scheduler: rows start in dispatch order, a window at a time
  (``ai_query._client``: the endpoint exchange, route -> admit -> send -> classify -> retry)
Collect:
  ``results``    ``CallResult`` and the exactly-once check
Entry:
  ``pipeline``   ``start_rows`` runs the stages for one batch of rows; ``shared_client``

``pipeline`` drives the client, which itself uses the stages above, so it is imported on its own
(``from ai_query.batch.pipeline import start_rows``) rather than re-exported here.
"""

from .answers import StageAnswers, stage_answers
from .journal import JOURNAL_PROPERTY, ResponseJournal, TaskJournal, read_entries, replay
from .plan import MODES, GroupPlan, RowGroup, group_rows, mean_shared_prefix, plan_group, prefix_order
from .request import RequestKey, canonical_json, prompt_text_of, request_key, traffic_point
from .results import CallResult, check_exactly_once, shared_copy, without_gaps
from .scheduler import WindowScheduler, window_size

__all__ = [
    "JOURNAL_PROPERTY", "MODES", "CallResult", "GroupPlan", "RequestKey", "ResponseJournal", "RowGroup", "StageAnswers",
    "TaskJournal", "WindowScheduler", "canonical_json", "check_exactly_once", "group_rows", "mean_shared_prefix", "plan_group",
    "prefix_order", "prompt_text_of", "read_entries", "replay", "request_key", "shared_copy", "stage_answers",
    "traffic_point", "window_size", "without_gaps",
]

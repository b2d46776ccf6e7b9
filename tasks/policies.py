"""Caching, persistence and retry options shared by the stage tasks.

Compute stages are cached on (task source, every input but the progress flag): the inputs carry
the model's revision/content hash, upstream stage keys, the stage's own config and the content
hash of any text file read, and the work dir (cached refs point into it). Results are persisted
as JSON refs to files, never pickles. Only I/O stages (fetch, publish, tracking) retry, with
exponential backoff: a retried computation would just fail the same way again.
"""

from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.tasks import exponential_backoff

STAGE = dict(
    cache_policy=(TASK_SOURCE + INPUTS) - "progress",
    persist_result=True,
    result_serializer="json",
)
UNCACHED = dict(cache_policy=NO_CACHE, persist_result=False)
IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)

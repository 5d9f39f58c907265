"""Host side of the continuous-batching engine: page pool, prefix cache and step scheduler.

Plain Python + numpy (no JAX): `Scheduler.schedule()` returns a `StepPlan` (page table, kv lengths,
query offsets, packed tokens and positions) for the device step, `Scheduler.update()` takes the
sampled tokens back.
"""

from jaxinfer.engine.pages import PagePool, PagePoolError
from jaxinfer.engine.plan import Request, RequestState, SchedulerStats, StepPlan
from jaxinfer.engine.prefix_cache import PrefixCache, PrefixCacheStats
from jaxinfer.engine.scheduler import Scheduler

__all__ = ["PagePool", "PagePoolError", "PrefixCache", "PrefixCacheStats", "Request",
           "RequestState", "Scheduler", "SchedulerStats", "StepPlan"]

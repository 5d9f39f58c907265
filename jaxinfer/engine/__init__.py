"""The continuous-batching engine: host scheduler, paged KV pool and jitted device step.

Host side (plain Python + numpy): `Scheduler.schedule()` returns a `StepPlan` (page table, kv
lengths, query offsets, packed tokens and positions) for the device step, `Scheduler.update()`
takes the sampled tokens back; `GroupedScheduler` runs one `Scheduler` per slot group (a pool
segment per attention batch shard, batch-sharded attention plans). Device side
(`jaxinfer.engine.device`): the paged pool and one jitted step; `jaxinfer.engine.loop`: the
on-device multi-step decode loop.
`Engine(model, EngineConfig).stream(prompts, params)` runs the loop as an iterator of
`TokenEvent`s; `.generate` collects it into an `EngineResult`; `.abort(index)` ends a request.
"""

from jaxinfer.engine.config import EngineConfig, EngineResult, EngineStats
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.groups import GroupedScheduler
from jaxinfer.engine.pages import PagePool, PagePoolError
from jaxinfer.engine.plan import Request, RequestState, SchedulerStats, StepPlan
from jaxinfer.engine.prefix_cache import PrefixCache, PrefixCacheStats
from jaxinfer.engine.run import TokenEvent
from jaxinfer.engine.scheduler import Scheduler

__all__ = ["Engine", "EngineConfig", "EngineResult", "EngineStats", "GroupedScheduler",
           "PagePool", "PagePoolError",
           "PrefixCache", "PrefixCacheStats", "Request", "RequestState", "Scheduler",
           "SchedulerStats", "StepPlan", "TokenEvent"]

"""Scheduler, KV block manager, sampler, model runner and the Engine/LLM API.

The scheduler, block manager and sequence types are plain Python (no torch import), so
`import mixq.engine.scheduler` stays light; the engine proper lives in mixq.engine.engine.
"""

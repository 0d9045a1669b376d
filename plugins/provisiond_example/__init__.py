"""A minimal provisiond plugin: one RPC operation, one background task.

`P/rpc/example/echo` (scope `daemon:read`) answers `{"echo": <message>,
"greeting": <config greeting>}` and publishes `P/events/example/echoed`.
Enable it with:

    [plugins.example]
    greeting = "hello"

It is the worked example of plugins/README.md and is tested in
tests/test_plugins.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from provisiond.plugins import PluginContext
from provisiond.rpc import Body, Operation, Request


class EchoBody(Body):
    message: str = Field(max_length=256)


class ExampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    greeting: str = "hello"
    # How often the background task logs that it is alive; 0 turns it off.
    tick_seconds: float = Field(default=0.0, ge=0)


class ExamplePlugin:
    name: ClassVar[str] = "example"
    Config: ClassVar[type[BaseModel]] = ExampleConfig

    def __init__(self) -> None:
        self.ctx: PluginContext | None = None

    async def start(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        config: ExampleConfig = ctx.config

        async def echo(request: Request, body: EchoBody) -> dict[str, Any]:
            await ctx.publish_event("example/echoed", {"length": len(body.message)})
            return {"echo": body.message, "greeting": config.greeting}

        ctx.register_operation(Operation("example/echo", echo, body=EchoBody, scope="daemon:read"))
        if config.tick_seconds > 0:
            ctx.spawn(self._tick(ctx, config.tick_seconds), name="tick")
        ctx.log.info("example.started", greeting=config.greeting)

    async def _tick(self, ctx: PluginContext, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            ctx.log.debug("example.tick")

    async def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.log.info("example.stopping")

"""Typed keys for the node's shared state: one place, no singletons."""

from __future__ import annotations

from aiohttp import web

from p2pshare.config import NodeConfig
from p2pshare.jobs import Jobs
from p2pshare.store import Store
from p2pshare.transfer import Engine

config_key = web.AppKey("config_key", NodeConfig)
store_key = web.AppKey("store_key", Store)
engine_key = web.AppKey("engine_key", Engine)
jobs_key = web.AppKey("jobs_key", Jobs)
token_key = web.AppKey("token_key", str)

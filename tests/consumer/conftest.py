"""Fixtures of the consumer's tests: a fake bridge on loopback (tests/consumer/fakeserver.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.consumer.fakeserver import MEASUREMENTS, FakeBridge, LoopThread, expect_yaml, start_site


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def serve(loop_thread: LoopThread) -> Iterator[Callable[[web.Application], str]]:
    """Start an aiohttp application on 127.0.0.1 (a free port) in the loop thread; its URL."""
    runners: list[web.AppRunner] = []

    def start(app: web.Application) -> str:
        runner, url = loop_thread.run(start_site(app))
        runners.append(runner)
        return url

    yield start
    for runner in reversed(runners):
        loop_thread.run(runner.cleanup())


@pytest.fixture(scope="session")
def nsm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One emulator CA for the session (making one costs more than a test); tests that move the
    emulator's clock use their own."""
    return tmp_path_factory.mktemp("nsm-state")


@pytest.fixture
def bridge(nsm_state: Path) -> FakeBridge:
    return FakeBridge(nsm_state)


@pytest.fixture
def url(bridge: FakeBridge, serve: Callable[[web.Application], str]) -> str:
    return serve(bridge.app())


@pytest.fixture
def expect_file(tmp_path: Path) -> Path:
    path = tmp_path / "expect.yaml"
    path.write_text(expect_yaml(MEASUREMENTS))
    return path

"""The real server for tests: the app under uvicorn in a thread, on a free port, over a tiny random
checkpoint (with tokenizer). Import the fixtures into a test module to use them:

    from server_util import backend, server, LiveServer  # noqa: F401

`server` is one app with a ledger (SQLite file) and one key (`server.secret`); tests that need
another configuration build their own app over the shared `backend` with `LiveServer(app)`.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

MODEL_NAME = "exaone-tiny"


class LiveServer:
    """uvicorn serving `app` in a daemon thread; `url` is http://127.0.0.1:PORT."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Several engines share 2 busy cores: one intra-op thread each, or they thrash. Autouse in
    every test module that imports it (pytest finds fixtures among a module's names)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """A tiny random hybrid model with our test tokenizer and the EXAONE 4.0 chat template."""
    from exaone.testing import make_random_checkpoint, tiny_config

    return make_random_checkpoint(tmp_path_factory.mktemp("chat_tiny"), tiny_config(max_position_embeddings=512))


@pytest.fixture(scope="session")
def backend(chat_checkpoint):
    from exaone.server.backend import LocalBackend

    b = LocalBackend(chat_checkpoint, max_batch=4, name=MODEL_NAME, prefill_chunk=64).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def ledger(tmp_path_factory):
    from exaone.server.ledger import Ledger

    led = Ledger(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'exaone.db'}")
    yield led
    led.close()


@pytest.fixture(scope="session")
def server(backend, ledger):
    """The app with auth and a ledger; `server.secret` is a valid key, `server.key` its ApiKey."""
    from exaone.server.app import create_app

    key, secret = ledger.create_key("tests")
    live = LiveServer(create_app(backend, ledger=ledger))
    live.key, live.secret, live.ledger, live.backend = key, secret, ledger, backend
    yield live
    live.close()


def wait_for(cond, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()

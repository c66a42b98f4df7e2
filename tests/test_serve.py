"""``netra serve`` and ``netra token`` as an operator runs them: real
processes, real ports, a real data folder.

Development mode only on loopback; its secret kept in the data folder so
``netra token`` mints tokens the running server accepts, before and after a
restart; a busy port as one line; the README's Python example run as written;
and the Dockerfile's parts that can be checked without a Docker engine (its
command, health check and stop timing run here against real servers).
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from netra.auth import is_loopback
from netra.client import connect
from netra.config import Config
from netra.testing import config_for_tests, open_server

ROOT = Path(__file__).resolve().parent.parent
STEP_S = 20  # one command, or one server start

SECRET = "s" * 40


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any NETRA_ setting: the defaults, as on a
    fresh checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETRA_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


async def netra(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(STEP_S):
        return await trio.run_process(
            [sys.executable, "-m", "netra", *args],
            cwd=cwd, env=env, stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
        )


@attrs.define
class Served:
    http_url: str
    ws_url: str
    stderr: bytearray
    returncode: int | None = None

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace")


@asynccontextmanager
async def netra_serve(*args: str, cwd: Path, env: dict[str, str]) -> AsyncIterator[Served]:
    """``netra serve ARGS`` until it listens; SIGTERM (a drain) on the way out."""
    argv = [sys.executable, "-m", "netra", "serve", *args]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(functools.partial(
            trio.run_process, argv, cwd=cwd, env=env, stdin=b"", stderr=subprocess.PIPE, check=False,
        ))
        stderr = bytearray()
        settled, ended = trio.Event(), trio.Event()  # listening or gone; gone

        async def pump() -> None:
            async for chunk in process.stderr:  # read to the end: logs go there too
                stderr.extend(chunk)
                if re.search(rb"^  WebSocket: \S+\n", stderr, re.MULTILINE):
                    settled.set()
            settled.set()
            ended.set()

        nursery.start_soon(pump)
        with trio.fail_after(STEP_S):
            await settled.wait()
        text = stderr.decode(errors="replace")
        assert not ended.is_set(), f"netra serve did not start:\n{text}"
        served = Served(
            http_url=re.search(r"^netra \S+ listening on (http://\S+)$", text, re.MULTILINE).group(1),
            ws_url=re.search(r"^  WebSocket: (ws://\S+)$", text, re.MULTILINE).group(1),
            stderr=stderr,
        )
        try:
            yield served
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(STEP_S):
                served.returncode = await process.wait()
                await ended.wait()


async def free_port() -> str:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


async def first_frame_user(ws_url: str, token: str) -> str:
    with trio.fail_after(10):
        async with connect(ws_url, token) as conn:
            return conn.user_id


# -- development mode never faces the network ------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.com", ""])
async def test_development_mode_refuses_any_interface_but_loopback(tmp_path, host):
    done = await netra("serve", "--host", host, "--port", "0", cwd=tmp_path, env=child_env())
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("netra serve: no NETRA_JWT_SECRET: "), err
    assert "set NETRA_JWT_SECRET" in err and "or listen on 127.0.0.1" in err
    assert not (tmp_path / "data").exists()  # nothing was created either


async def test_an_explicit_dev_mode_is_refused_on_a_public_interface_too(tmp_path):
    env = child_env(NETRA_JWT_SECRET=SECRET, NETRA_DEV_MODE="1", NETRA_HOST="0.0.0.0")
    done = await netra("serve", "--port", "0", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "netra serve: NETRA_DEV_MODE would give a token to anyone who reaches 0.0.0.0; unset it, "
        "or listen on 127.0.0.1\n"
    )


async def test_with_a_key_any_interface_is_fine_and_no_token_is_given_away(tmp_path):
    env = child_env(NETRA_JWT_SECRET=SECRET, NETRA_DATABASE_URL="none")
    async with netra_serve("--host", "0.0.0.0", "--port", "0", cwd=tmp_path, env=env) as served:
        port = served.http_url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.fail_after(10):
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/api/dev-token")).status_code == 404
    assert "development mode" not in served.text
    assert served.returncode == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False),
     ("localhost.example.com", False), ("::ffff:192.0.2.1", False)],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


# -- the development secret: kept in the data folder, used by `netra token` --------


async def test_netra_token_mints_for_a_server_on_defaults_and_tokens_survive_a_restart(tmp_path):
    env = child_env()  # nothing set: data folder ./data, SQLite, development mode
    before = await netra("token", "--user", "bob", cwd=tmp_path, env=env)
    assert before.returncode == 2
    assert "start `netra serve` once" in before.stderr.decode() and "data/dev-secret" in before.stderr.decode()

    async with netra_serve("--port", "0", cwd=tmp_path, env=env) as served:
        assert f"signing key created in {os.path.join('data', 'dev-secret')}" in served.text
        minted = await netra("token", "--user", "bob", cwd=tmp_path, env=env)
        assert minted.returncode == 0, minted.stderr.decode()
        assert minted.stderr.decode() == f"netra token: signed with the development secret in {os.path.join('data', 'dev-secret')}\n"
        token = minted.stdout.decode().strip()
        assert await first_frame_user(served.ws_url, token) == "bob"
    assert served.returncode == 0

    secret_file = tmp_path / "data" / "dev-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    kept = secret_file.read_bytes()

    async with netra_serve("--port", "0", cwd=tmp_path, env=env) as served:
        assert "signing key reused" in served.text
        assert await first_frame_user(served.ws_url, token) == "bob"  # the same token, after a restart
    assert secret_file.read_bytes() == kept


async def test_netra_token_prefers_netra_jwt_secret_and_carries_the_configured_claims(tmp_path):
    env = child_env(NETRA_JWT_SECRET=SECRET, NETRA_JWT_AUDIENCE="chat", NETRA_JWT_ISSUER="https://id.example")
    minted = await netra("token", "--user", "cy", cwd=tmp_path, env=env)
    assert minted.returncode == 0 and minted.stderr == b""
    config = config_for_tests(jwt_secret=SECRET, jwt_audience="chat", jwt_issuer="https://id.example")
    async with open_server(config) as server:
        assert await first_frame_user(server.ws_url, minted.stdout.decode().strip()) == "cy"


async def test_a_dev_secret_others_may_read_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    secret_file = tmp_path / "data" / "dev-secret"
    secret_file.write_text("x" * 43 + "\n")
    secret_file.chmod(0o644)
    for args in (["token", "--user", "dee"], ["serve", "--port", "0"]):
        done = await netra(*args, cwd=tmp_path, env=child_env())
        assert done.returncode == 2
        assert "may be read by other users: chmod 600 it" in done.stderr.decode()


@pytest.mark.parametrize("ttl", ["0", "-5", "nan", "inf", "1e300"])
async def test_netra_token_refuses_a_ttl_it_cannot_sign(tmp_path, ttl):
    done = await netra("token", "--user", "eve", "--ttl", ttl, cwd=tmp_path, env=child_env(NETRA_JWT_SECRET=SECRET))
    assert done.returncode == 2
    assert done.stderr.decode() == "netra token: --ttl must be a positive number of seconds (ending before year 10000)\n"


# -- a port that cannot be had: one line, exit 2 ---------------------------------


async def test_a_busy_port_is_one_line_and_exit_status_2(tmp_path):
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = child_env(NETRA_JWT_SECRET=SECRET, NETRA_DATABASE_URL="none")
        done = await netra("serve", "--port", str(port), cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.decode() == f"netra: cannot listen on 127.0.0.1:{port}: address already in use\n"


# -- the README's Python example, as written ------------------------------------------


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- example: python client -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md lost its '<!-- example: python client -->' python block"
    return found.group(1)


async def test_readme_python_example_runs_as_written_after_make_run(tmp_path):
    """`make run` is `netra serve` on the defaults; the example, saved as
    example.py in the same folder, runs unchanged (only NETRA_URL says
    where the test's server listens: port 8000 may be someone else's)."""
    (tmp_path / "example.py").write_text(readme_python_example())
    async with netra_serve("--port", "0", cwd=tmp_path, env=child_env()) as served:
        with trio.fail_after(STEP_S):
            done = await trio.run_process(
                [sys.executable, "example.py"], cwd=tmp_path, env=child_env(NETRA_URL=served.ws_url),
                stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
            )
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    types = [line.split(" ", 1)[0] for line in lines]
    assert types[0] == "agent_started" and types[-1] == "agent_completed", lines
    assert {"agent_thinking", "tool_executing", "tool_completed"} <= set(types)
    assert "42" in lines[-1]


# -- the Dockerfile ----------------------------------------------------------------


@attrs.frozen
class Dockerfile:
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    stopsignal: str

    @classmethod
    def read(cls) -> Dockerfile:
        text = (ROOT / "Dockerfile").read_text()
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        instructions = re.split(r"\n(?=[A-Z]+\s)", "\n".join(lines).replace("\\\n", " "))
        env: dict[str, str] = {}
        found: dict[str, str] = {}
        for instruction in instructions:
            name, _, rest = instruction.strip().partition(" ")
            if name == "ENV":
                env.update(re.findall(r"(\w+)=(\S+)", rest))
            else:
                found[name] = rest.strip()
        health = found["HEALTHCHECK"]
        return cls(
            env=env,
            entrypoint=json.loads(found["ENTRYPOINT"]),
            cmd=json.loads(found["CMD"]),
            healthcheck=json.loads(health[health.index("CMD ") + 4:]),
            stopsignal=found["STOPSIGNAL"],
        )

    def run_env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        """The image's environment, with its data folder moved to ``tmp_path``."""
        env = {k: v for k, v in self.env.items() if k.startswith("NETRA_")} | {"NETRA_DATA_DIR": str(tmp_path)}
        return child_env(**(env | extra))


async def test_the_image_refuses_to_start_without_a_key(tmp_path):
    image = Dockerfile.read()
    assert image.entrypoint == ["netra"]
    done = await netra(*image.cmd, cwd=tmp_path, env=image.run_env(tmp_path))
    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.count("\n") == 1 and "set NETRA_JWT_SECRET" in err and "0.0.0.0" in err


async def test_the_image_starts_with_a_key_and_its_health_check_follows_netra_port(tmp_path):
    image = Dockerfile.read()
    assert image.cmd == ["serve"], "flags would override NETRA_HOST / NETRA_PORT, which the health check follows"
    env = image.run_env(tmp_path, NETRA_JWT_SECRET=SECRET, NETRA_PORT="0", NETRA_DATABASE_URL="none")
    async with netra_serve(*image.cmd[1:], cwd=tmp_path, env=env) as served:
        assert served.http_url.startswith("http://0.0.0.0:")
        port = served.http_url.rsplit(":", 1)[1]
        check = [sys.executable if image.healthcheck[0] == "python" else image.healthcheck[0], *image.healthcheck[1:]]
        with trio.fail_after(STEP_S):
            healthy = await trio.run_process(check, env=image.run_env(tmp_path, NETRA_PORT=port), check=False,
                                             capture_stdout=True, capture_stderr=True)
            assert healthy.returncode == 0, healthy.stderr.decode()
            unhealthy = await trio.run_process(check, env=image.run_env(tmp_path, NETRA_PORT=await free_port()),
                                               check=False, capture_stdout=True, capture_stderr=True)
            assert unhealthy.returncode == 1
    assert served.returncode == 0


def test_the_images_drain_fits_inside_docker_stop():
    """`docker stop` sends STOPSIGNAL, waits 10 s by default, then kills.
    A drain takes at most drain_grace_s, then close_timeout_s + 1 s for the
    close frames; keep a second for hypercorn and the process to exit."""
    image = Dockerfile.read()
    assert image.stopsignal == "SIGTERM"
    config = Config.load(environ={k: v for k, v in image.env.items() if k.startswith("NETRA_")})
    assert config.drain_grace_s + config.close_timeout_s + 1 <= 10 - 1


def test_the_image_leaves_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", ".venv", ".git"} <= set(ignored)  # a development secret is never baked into an image

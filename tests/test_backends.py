"""The test suite finds the local PostgreSQL by itself, as CI does, so
`make test` runs what CI runs; it skips those cases, saying why, only when
no server answers."""

from __future__ import annotations

import socket

import pytest

from tests._backends import PG_ENV, PG_LOCAL, pg_candidate, pg_connect, redacted


def test_the_setting_wins_and_the_local_default_is_tried_without_it():
    assert pg_candidate({PG_ENV: "postgresql://u@db.example:6543/x"}) == ("postgresql://u@db.example:6543/x", PG_ENV)
    url, origin = pg_candidate({})
    assert url == PG_LOCAL == "postgresql://postgres@127.0.0.1:5432/test"
    assert PG_ENV in origin
    assert pg_candidate({PG_ENV: ""})[0] == PG_LOCAL  # set but empty: as unset


def test_the_local_postgresql_is_used_without_any_setting():
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", 5432)) != 0:
            pytest.skip("no PostgreSQL listens on 127.0.0.1:5432 here")
    conn, url = pg_connect({})  # would skip, saying why, if it did not answer as postgres
    with conn:
        assert url == PG_LOCAL
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_answer_skips_with_the_reason():
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://postgres:hunter2@127.0.0.1:{port}/test"
    with pytest.raises(pytest.skip.Exception) as skipped:
        pg_connect({PG_ENV: url})
    reason = str(skipped.value)
    assert reason.startswith(f"PostgreSQL not tested: no answer from postgresql://postgres:***@127.0.0.1:{port}/test ({PG_ENV})")
    assert "hunter2" not in reason
    assert redacted("postgresql://a@h/d") == "postgresql://a@h/d"

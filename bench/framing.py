"""``python -m bench framing``: what WebSocket framing and JSON encoding cost per run.

One run of the golden path, as a server sees it, is 1 masked client frame
in (the user_message) and 10 event frames out (unmasked, JSON text of 80 to
300 bytes). This measures, per run and in one process (no socket), what
each way of doing that framing costs:

- ``wsproto``: ``WSConnection(SERVER)`` after a real handshake:
  ``send(Message)`` per event, ``receive_data`` + ``events()`` for the client
  frame (what hypercorn does for netra today);
- ``websockets``: the sans-I/O ``websockets.server.ServerProtocol`` after a
  real handshake: ``send_text`` + ``data_to_send`` per event,
  ``receive_data`` + ``events_received`` (its C ``apply_mask`` when built);
- ``websockets.frames``: the same package's frame layer alone, no protocol
  state: ``Frame(TEXT, data).serialize()`` and ``Frame.parse`` over a
  ``StreamReader``;
- ``hand-built``: a 2, 4 or 10-byte header written by hand + payload; the
  client frame's header read by hand, unmasked with one ``int.from_bytes``
  XOR and decoded (a server must refuse invalid UTF-8 with 1007).

And the client's side of the same run (10 server frames to parse, 1 masked
frame to build), which is what a load client pays. Then the JSON: the 10
events encoded with ``json.dumps`` (as netra does today:
``ensure_ascii=False, separators=(",", ":")`` and ``.encode()``) against
``orjson.dumps``, and the user_message decoded with ``json.loads`` against
``orjson.loads``.

The events are the scripted run's own (``bench/peers/_script.py``, which
mirrors netra's), with ``seq`` and ``ts``. Every framing's output is checked
against the others' before anything is timed. Figures: the best of
``--repeat`` batches of ``--runs`` runs, in microseconds per run (and the
median batch). A table goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from _script import new_id, script  # noqa: E402

from . import _rawclient  # noqa: E402
from .hotpath import machine  # noqa: E402

TEXT = 'what is [[tool:calculator {"expression": "6*7"}]]'
REQUEST = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Protocol: netra.v1\r\n\r\n")


def events() -> list[dict[str, Any]]:
    """The 10 events of one scripted calculator run, as the server sends them."""
    out = []
    ts = int(time.time() * 1000)
    for seq, step in enumerate((s for s in script(TEXT, run_id=new_id(), thread_id=new_id(), ref="m-1",
                                                  delay_s=0.0) if not isinstance(s, float)), start=2):
        out.append({"type": step.pop("type"), "seq": seq, "ts": ts, **step})
    return out


def encode_json(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str).encode()


# --------------------------------------------------------------------------
# hand-built


def hb_server_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126, n >> 8, n & 0xFF)) + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def hb_parse_masked(data: bytes) -> tuple[int, bytes, int]:
    """(opcode, unmasked payload, bytes used) of one masked client frame."""
    b1 = data[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        n = (data[2] << 8) | data[3]
        pos = 4
    elif n == 127:
        n = int.from_bytes(data[2:10], "big")
        pos = 10
    if not b1 & 0x80:
        raise ValueError("client frame not masked")
    key = data[pos:pos + 4]
    pos += 4
    end = pos + n
    mask = int.from_bytes((key * ((n + 3) >> 2))[:n], "big")
    return data[0] & 0x0F, (int.from_bytes(data[pos:end], "big") ^ mask).to_bytes(n, "big"), end


def hb_parse_unmasked(data: bytes) -> list[bytes]:
    out = []
    pos, total = 0, len(data)
    while pos < total:
        n = data[pos + 1] & 0x7F
        hl = 2
        if n == 126:
            n = (data[pos + 2] << 8) | data[pos + 3]
            hl = 4
        elif n == 127:
            n = int.from_bytes(data[pos + 2:pos + 10], "big")
            hl = 10
        out.append(data[pos + hl:pos + hl + n])
        pos += hl + n
    return out


# --------------------------------------------------------------------------
# wsproto


def wsproto_server():
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    conn = WSConnection(ConnectionType.SERVER)
    conn.receive_data(REQUEST)
    request = next(e for e in conn.events() if isinstance(e, Request))
    conn.send(AcceptConnection(subprotocol=request.subprotocols[0]))
    return conn


def wsproto_client():
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="127.0.0.1", target="/ws", subprotocols=["netra.v1"])))
    list(server.events())
    client.receive_data(server.send(AcceptConnection(subprotocol="netra.v1")))
    list(client.events())
    return client


# --------------------------------------------------------------------------
# websockets (sans-I/O)


def websockets_server():
    from websockets.server import ServerProtocol

    proto = ServerProtocol(subprotocols=["netra.v1"])
    proto.receive_data(REQUEST)
    request = proto.events_received()[0]
    proto.send_response(proto.accept(request))
    proto.data_to_send()
    return proto


def websockets_client():
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), subprotocols=["netra.v1"])
    request = client.connect()
    client.send_request(request)
    raw = b"".join(client.data_to_send())
    server = _ws_server_for(raw)
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    return client


def _ws_server_for(raw: bytes):
    from websockets.server import ServerProtocol

    proto = ServerProtocol(subprotocols=["netra.v1"])
    proto.receive_data(raw)
    proto.send_response(proto.accept(proto.events_received()[0]))
    return proto


# --------------------------------------------------------------------------
# the cases


def build_cases(payloads: list[bytes], client_frame: bytes, user_message: bytes
                ) -> dict[str, dict[str, Callable[[], Any]]]:
    """name -> {"server_out", "server_in", "client_in", "client_out"}: each a
    no-argument function doing that side's part of one run."""
    from wsproto.events import Message, TextMessage

    server_stream = b"".join(hb_server_frame(p) for p in payloads)

    ws_srv = wsproto_server()
    ws_cli = wsproto_client()

    def wsproto_out() -> list[bytes]:
        send = ws_srv.send
        return [send(Message(data=p.decode())) for p in payloads]

    def wsproto_in() -> str:
        ws_srv.receive_data(client_frame)
        for event in ws_srv.events():
            if isinstance(event, TextMessage):
                return event.data
        raise AssertionError("wsproto: no message")

    def wsproto_client_in() -> list[str]:
        ws_cli.receive_data(server_stream)
        return [e.data for e in ws_cli.events()]

    def wsproto_client_out() -> bytes:
        return ws_cli.send(Message(data=user_message.decode()))

    wss = websockets_server()
    wsc = websockets_client()

    def websockets_out() -> list[bytes]:
        out = []
        for p in payloads:
            wss.send_text(p)
            out.extend(wss.data_to_send())
        return out

    def websockets_in() -> bytes:
        wss.receive_data(client_frame)
        return wss.events_received()[0].data

    def websockets_client_in() -> list[bytes]:
        wsc.receive_data(server_stream)
        return [f.data for f in wsc.events_received()]

    def websockets_client_out() -> bytes:
        wsc.send_text(user_message)
        return b"".join(wsc.data_to_send())

    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    def frames_parse(data: bytes, mask: bool) -> list[bytes]:
        reader = StreamReader()
        reader.feed_data(data)
        out = []
        while reader.buffer:
            gen = Frame.parse(reader.read_exact, mask=mask)
            try:
                next(gen)
            except StopIteration as done:
                frame = done.value
            else:
                raise AssertionError("websockets.frames: incomplete frame")
            out.append(frame.data.decode() if mask else frame.data)
        return out

    def frames_out() -> list[bytes]:
        return [Frame(Opcode.TEXT, p).serialize(mask=False) for p in payloads]

    def frames_in() -> str:
        return frames_parse(client_frame, True)[0]

    def frames_client_in() -> list[bytes]:
        return frames_parse(server_stream, False)

    def frames_client_out() -> bytes:
        return Frame(Opcode.TEXT, user_message).serialize(mask=True)

    def hand_out() -> list[bytes]:
        return [hb_server_frame(p) for p in payloads]

    def hand_in() -> str:
        return hb_parse_masked(client_frame)[1].decode()  # a server must check UTF-8 (else close 1007)

    def hand_client_in() -> list[bytes]:
        return hb_parse_unmasked(server_stream)

    def hand_client_out() -> bytes:
        return _rawclient.client_frame(user_message)

    return {
        "wsproto": {"server_out": wsproto_out, "server_in": wsproto_in,
                    "client_in": wsproto_client_in, "client_out": wsproto_client_out},
        "websockets": {"server_out": websockets_out, "server_in": websockets_in,
                       "client_in": websockets_client_in, "client_out": websockets_client_out},
        "websockets.frames": {"server_out": frames_out, "server_in": frames_in,
                              "client_in": frames_client_in, "client_out": frames_client_out},
        "hand-built": {"server_out": hand_out, "server_in": hand_in,
                       "client_in": hand_client_in, "client_out": hand_client_out},
    }


def check(cases: dict[str, dict[str, Callable[[], Any]]], payloads: list[bytes], user_message: bytes) -> None:
    """Every framing must produce and read the same bytes before it is timed."""
    expected_frames = [hb_server_frame(p) for p in payloads]
    for name, case in cases.items():
        frames = case["server_out"]()
        if [bytes(f) for f in frames] != expected_frames:
            raise AssertionError(f"{name}: server frames differ from RFC 6455 minimal framing")
        got = case["server_in"]()
        if (got.encode() if isinstance(got, str) else bytes(got)) != user_message:
            raise AssertionError(f"{name}: client frame decoded wrongly")
        got = case["client_in"]()
        if [g.encode() if isinstance(g, str) else bytes(g) for g in got] != payloads:
            raise AssertionError(f"{name}: server frames decoded wrongly")
        out = case["client_out"]()
        op, payload, used = hb_parse_masked(bytes(out))
        if op != 1 or payload != user_message or used != len(out):
            raise AssertionError(f"{name}: client frame not a masked text frame of the message")


def timed(fn: Callable[[], Any], runs: int, repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(runs):
            fn()
        samples.append((time.perf_counter() - t0) / runs * 1e6)
    return {"best": round(min(samples), 2), "median": round(statistics.median(samples), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench framing", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5000, help="runs per timed batch (default: 5000)")
    p.add_argument("--repeat", type=int, default=7, help="batches; the best and the median are given (default: 7)")
    p.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.repeat < 1:
        p.error("--runs and --repeat must be >= 1")
    try:
        import orjson
    except ImportError:  # the bench extra installs it
        orjson = None

    evs = events()
    payloads = [encode_json(e) for e in evs]
    user_message = _rawclient.message("u1-0000", 6, 6)
    client_frame = _rawclient.client_frame(user_message)
    cases = build_cases(payloads, client_frame, user_message)
    check(cases, payloads, user_message)

    out: dict[str, Any] = {
        "meta": {"benchmark": "framing", "machine": machine(), "runs": args.runs, "repeat": args.repeat,
                 "events_per_run": len(payloads), "event_bytes": [len(x) for x in payloads],
                 "client_frame_bytes": len(client_frame),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "framing_us_per_run": {}, "json_us_per_run": {},
    }
    for name, case in cases.items():
        row = {part: timed(fn, args.runs, args.repeat) for part, fn in case.items()}
        row["server_total"] = round(row["server_out"]["best"] + row["server_in"]["best"], 2)
        row["client_total"] = round(row["client_in"]["best"] + row["client_out"]["best"], 2)
        out["framing_us_per_run"][name] = row

    def dumps_json() -> list[bytes]:
        return [encode_json(e) for e in evs]

    def loads_json() -> Any:
        return json.loads(user_message)

    js = {"dumps 10 events": {"json": timed(dumps_json, args.runs, args.repeat)},
          "loads 1 user_message": {"json": timed(loads_json, args.runs, args.repeat)}}
    if orjson is not None:
        if [orjson.loads(orjson.dumps(e)) for e in evs] != [json.loads(x) for x in payloads]:
            raise AssertionError("orjson and json disagree on the events")
        js["dumps 10 events"]["orjson"] = timed(lambda: [orjson.dumps(e) for e in evs], args.runs, args.repeat)
        js["loads 1 user_message"]["orjson"] = timed(lambda: orjson.loads(user_message), args.runs, args.repeat)
        for row in js.values():
            row["json/orjson"] = round(row["json"]["best"] / row["orjson"]["best"], 2)
    out["json_us_per_run"] = js

    m = out["meta"]["machine"]
    log = lambda text="": print(text, file=sys.stderr)  # noqa: E731
    log(f"machine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}")
    log(f"one run = {len(payloads)} event frames out ({min(out['meta']['event_bytes'])}-"
        f"{max(out['meta']['event_bytes'])} bytes of JSON each) + 1 masked client frame in "
        f"({len(client_frame)} bytes); microseconds per run, best of {args.repeat} x {args.runs} runs (median)")
    log()
    log(f"{'framing':<18}{'server: 10 out':>16}{'1 in':>14}{'server total':>14}"
        f"{'client: 10 in':>16}{'1 out':>14}{'client total':>14}")
    for name, row in out["framing_us_per_run"].items():
        cell = lambda part: f"{row[part]['best']:.2f} ({row[part]['median']:.2f})"  # noqa: E731
        log(f"{name:<18}{cell('server_out'):>16}{cell('server_in'):>14}{row['server_total']:>14.2f}"
            f"{cell('client_in'):>16}{cell('client_out'):>14}{row['client_total']:>14.2f}")
    log()
    log(f"{'json':<24}{'json':>16}{'orjson':>16}{'json/orjson':>13}")
    for name, row in js.items():
        cell = lambda r: f"{r['best']:.2f} ({r['median']:.2f})" if r else "not installed"  # noqa: E731
        log(f"{name:<24}{cell(row['json']):>16}{cell(row.get('orjson')):>16}{str(row.get('json/orjson', '')):>13}")
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Interop driver: runs the official OpenTelemetry Python OpAMP client
(`opentelemetry-opamp-client`, see requirements.txt) against an OpAMP server
over plain HTTP and reports what happens as JSON lines on stdout.

Usage:
  opamp_agent.py --endpoint http://127.0.0.1:PORT/v1/opamp \
      [--attr service.name=foo ...] [--non-id-attr host.name=bar ...] \
      [--timeout 30] [--poll-interval 1] [--reject-config] [--full-state-ack] \
      [--header Authorization="Bearer fp_..."]

Events (one JSON object per line, flushed immediately):
  {"event":"started","instance_uid":"<32 hex chars>"}   client started, first
                                                         (full-state) message queued
  {"event":"connected"}                                  first HTTP 2xx exchange done
  {"event":"config","hash":"<hex>","files":{name: body}} new remote config (by hash)
  {"event":"reported","status":"APPLIED"|"FAILED","hash":"<hex>"}
                                                         status message was sent
                                                         (or given up after retries)
  {"event":"server_error","type":N,"message":"..."}     ServerToAgent.error_response
  {"event":"stopped"}                                    AgentDisconnect sent, threads joined

Runs until stdin reaches EOF (so a parent holding a pipe controls lifetime;
note `</dev/null` means "stop at once"), SIGTERM/SIGINT, or --timeout seconds.
Exits 1 if a callback raised (the client itself only logs callback errors).
Client log output goes to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import signal
import sys
import threading
import traceback

from opentelemetry._opamp import MessageData, OpAMPAgent, OpAMPCallbacks, OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2

_lock = threading.Lock()


def emit(**event) -> None:
    with _lock:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
        sys.stdout.flush()


def kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


class DriverCallbacks(OpAMPCallbacks):
    def __init__(self, reject: bool, full_state_ack: bool, done: threading.Event):
        self.reject = reject
        self.full_state_ack = full_state_ack
        self.done = done
        self.connected = False
        self.last_hash: bytes | None = None
        self.failure: BaseException | None = None

    def on_connect(self, agent, client):
        if not self.connected:
            self.connected = True
            emit(event="connected")

    def on_error(self, agent, client, error_response):
        emit(event="server_error", type=int(error_response.type), message=error_response.error_message)

    def on_message(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData):
        try:
            self._handle(agent, client, message)
        except BaseException as exc:  # the client would swallow it; fail the run instead
            traceback.print_exc()
            self.failure = exc
            self.done.set()

    def _handle(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData):
        remote = message.remote_config
        # The client calls on_message for every response; servers may resend the
        # same config, so only act on a config hash we have not seen yet.
        if remote is None or not remote.config_hash or remote.config_hash == self.last_hash:
            return
        self.last_hash = remote.config_hash
        files = remote.config.config_map
        emit(
            event="config",
            hash=remote.config_hash.hex(),
            files={name: f.body.decode("utf-8", "replace") for name, f in files.items()},
        )

        if self.reject:
            status, name, error = opamp_pb2.RemoteConfigStatuses_FAILED, "FAILED", "rejected by test"
        else:
            status, name, error = opamp_pb2.RemoteConfigStatuses_APPLIED, "APPLIED", ""
            # update_effective_config takes one content type for all files; JSON
            # bodies must be given as parsed objects (they are re-serialized).
            types = {f.content_type for f in files.values()}
            ctype = types.pop() if len(types) == 1 else "text/plain"
            try:
                if ctype == "application/json":
                    effective = {n: json.loads(f.body) for n, f in files.items()}
                else:
                    effective = {n: f.body for n, f in files.items()}
                client.update_effective_config(effective, ctype)
            except ValueError as exc:
                status, name, error = opamp_pb2.RemoteConfigStatuses_FAILED, "FAILED", f"invalid JSON: {exc}"

        rcs = client.update_remote_config_status(remote.config_hash, status, error)
        if rcs is None:  # status unchanged for this hash: nothing to send
            return
        if self.full_state_ack:  # status + effective config + description
            payload = client.build_full_state_message()
        else:  # what upstream examples do: status only
            payload = client.build_remote_config_status_response_message(rcs)
        hash_hex = remote.config_hash.hex()
        agent.send(payload, callback=lambda: emit(event="reported", status=name, hash=hash_hex))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--attr", type=kv, action="append", default=[], help="identifying attribute key=value")
    p.add_argument("--non-id-attr", type=kv, action="append", default=[], help="non-identifying attribute key=value")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before stopping by itself")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--reject-config", action="store_true", help="report FAILED instead of APPLIED")
    p.add_argument("--full-state-ack", action="store_true", help="ack with a full-state message (carries effective config)")
    p.add_argument("--http-timeout-ms", type=int, default=5000, help="per-request HTTP timeout (client default 1000)")
    p.add_argument("--header", type=kv, action="append", default=[], help="extra HTTP header Name=value (an API key)")
    p.add_argument("-v", "--verbose", action="store_true", help="client debug logs on stderr")
    args = p.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.WARNING)

    done = threading.Event()
    callbacks = DriverCallbacks(args.reject_config, args.full_state_ack, done)
    extra = {"headers": dict(args.header)} if args.header else {}
    client = OpAMPClient(
        endpoint=args.endpoint,
        timeout_millis=args.http_timeout_ms,
        **extra,
        agent_identifying_attributes=dict(args.attr),
        agent_non_identifying_attributes=dict(args.non_id_attr) or None,
    )
    agent = OpAMPAgent(interval=args.poll_interval, callbacks=callbacks, client=client)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def wait_stdin_eof():
        for _ in sys.stdin:
            pass
        done.set()

    threading.Thread(target=wait_stdin_eof, daemon=True).start()

    agent.start()
    # No public accessor for the instance UID (a 16-byte UUIDv7 made per client).
    emit(event="started", instance_uid=client._instance_uid.hex())

    done.wait(args.timeout)
    agent.stop()  # sends AgentDisconnect synchronously, then joins its threads
    atexit.unregister(agent.stop)  # start() registered it; avoid a 2nd AgentDisconnect at exit
    emit(event="stopped")
    return 1 if callbacks.failure else 0


if __name__ == "__main__":
    sys.exit(main())

"""The gateway as systemd runs it: real processes, real signals, real sockets."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import eventually
from zimage_tornado.sdnotify import Notifier

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_answers_every_waiting_client_and_loses_no_submit(gateways, fake):
    fake.outcome = "never"
    tasks = [fake.add_task("waits forever") for _ in range(5)]
    gateway = gateways("--max-attempts=100000", "--shutdown-timeout=10", "--upstream-timeout=10")
    await gateway.started()
    polls = [asyncio.ensure_future(gateway.fetch("/v1/images/%s" % tasks[i % 5])) for i in range(50)]
    chat = {"model": "zimage-turbo", "prompt": "a slow castle", "stream": True, "wait": True}
    streams = [asyncio.ensure_future(gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps(chat)))
               for _ in range(2)]
    while json.loads((await gateway.fetch("/health/ready")).body)["waiters"] < 52:
        await asyncio.sleep(0.05)
    fake.hang_seconds = 1.5
    fake.inject("generate", *["hang"] * 10)
    submits = [asyncio.ensure_future(gateway.fetch("/v1/chat/completions", method="POST",
                                                   body=json.dumps({"model": "zimage-turbo", "prompt": "p%d" % i})))
               for i in range(10)]
    while fake.calls["generate"] < 12:  # all 10 are in flight, held by the upstream
        await asyncio.sleep(0.02)

    started = time.monotonic()
    assert await gateway.stopped() == 0
    assert time.monotonic() - started < 10

    for response in await asyncio.gather(*polls):
        assert response.code == 202, response.body
        assert response.headers["Retry-After"]
        body = json.loads(response.body)
        assert body["uuid"] in tasks and body["status"] in ("pending", "processing")
    for response in await asyncio.gather(*submits):
        assert response.code == 200, response.body
        assert json.loads(response.body)["choices"][0]["message"]["content"] in fake.tasks
    for response in await asyncio.gather(*streams):
        text = response.body.decode()
        assert "The gateway is restarting" in text and text.rstrip().endswith("data: [DONE]")
    assert "Traceback" not in gateway.log()


@pytest.mark.gen_test(timeout=60)
async def test_sd_notify_ready_status_watchdog_and_stopping(gateways, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.setblocking(False)
    gateway = gateways(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"})
    messages: list[str] = []

    def received(predicate):
        try:
            messages.append(listener.recv(4096).decode())
        except BlockingIOError:
            pass
        return predicate()

    async def until(predicate, timeout=15.0):
        await eventually(lambda: received(predicate), timeout, 0.02, lambda: str(messages))

    await until(lambda: any("READY=1" in m for m in messages))
    # READY is sent only once the socket listens
    assert (await gateway.fetch("/health")).code == 200
    await until(lambda: sum("WATCHDOG=1" in m for m in messages) >= 3)
    assert any(re.search(r"STATUS=\d+ waiting, \d+ tasks polled", m) for m in messages)
    gateway.proc.send_signal(signal.SIGTERM)
    await until(lambda: any("STOPPING=1" in m for m in messages))
    assert await gateway.stopped(signum=None) == 0
    listener.close()


def test_notifier_speaks_to_abstract_sockets_and_halves_the_watchdog():
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = "zimage-test-%d" % os.getpid()
    listener.bind("\0" + name)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "10000000"})
    assert notifier.notify(READY=1, STATUS="ok")
    assert listener.recv(100) == b"READY=1\nSTATUS=ok"
    assert notifier.watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1", "NOTIFY_SOCKET": "@x"}).watchdog_interval is None
    assert not Notifier({}).notify(READY=1)
    listener.close()


@pytest.mark.gen_test(timeout=60)
async def test_two_worker_processes_both_answer_and_stop_together(gateways):
    gateway = gateways("--processes=2")
    await gateway.started()
    pids = set()
    for _ in range(200):
        response = await gateway.fetch("/health")  # a new connection each time
        pids.add(json.loads(response.body)["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2 and gateway.proc.pid not in pids
    assert await gateway.stopped() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.gen_test(timeout=60)
async def test_json_logs_carry_the_request_id(gateways):
    gateway = gateways("--log-format=json")
    await gateway.started()
    await gateway.fetch("/v1/models", headers={"X-Request-ID": "json-trace-1"})
    gateway.proc.send_signal(signal.SIGTERM)
    assert await gateway.stopped() == 0  # a second SIGTERM does not cut the graceful stop short
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    assert any(line["request_id"] == "json-trace-1" and "GET /v1/models" in line["message"] for line in lines)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd package (.ci/system-packages does)"
    unit = (ROOT / "deploy" / "zimage-tornado.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=", "EnvironmentFile=", "DynamicUser=yes",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert line in unit, line
    # verify wants ExecStart to exist: point it at this environment's console script
    script = Path(sys.executable).parent / "zimage-tornado"
    copy = tmp_path / "zimage-tornado.service"
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=%s" % script, unit))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "zimage-tornado" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_example_environment_file_names_real_settings():
    from zimage_tornado.config import Settings
    names = re.findall(r"(?m)^#?ZIMAGE_([A-Z_]+)=", (ROOT / "deploy" / "zimage-tornado.env").read_text())
    assert names and all(name.lower() in Settings.__dataclass_fields__ for name in names)

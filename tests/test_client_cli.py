"""The `zimage` console script, run as a real subprocess against a gateway on the fake upstream
(and against a gateway that is not there)."""

import asyncio
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest


ZIMAGE = str(Path(sys.executable).parent / "zimage")


async def zimage(*args, env=None, tty=False, timeout=60):
    """Runs the console script without blocking the loop that serves the gateway; returns
    (exit status, stdout, stderr). With tty, stderr is a terminal (a pty of 24 x 80)."""
    def run():
        environment = {**os.environ, **(env or {})}
        environment.pop("ZIMAGE_URL", None) if env is None or "ZIMAGE_URL" not in env else None
        if not tty:
            done = subprocess.run([ZIMAGE, *args], capture_output=True, text=True, timeout=timeout, env=environment)
            return done.returncode, done.stdout, done.stderr
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        seen = []

        def drain():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                if not data:
                    return
                seen.append(data)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        proc = subprocess.Popen([ZIMAGE, *args], stdout=subprocess.PIPE, stderr=slave, env=environment)
        out, _ = proc.communicate(timeout=timeout)
        os.close(slave)
        reader.join(2)
        os.close(master)
        return proc.returncode, out.decode(), b"".join(seen).decode(errors="replace")
    return await asyncio.get_running_loop().run_in_executor(None, run)


def test_the_console_script_is_installed():
    assert Path(ZIMAGE).exists()


@pytest.mark.gen_test(timeout=60)
async def test_pictures_are_saved_and_their_paths_printed(make_proxy, fake, tmp_path):
    fake.reads_to_complete = 4
    proxy = make_proxy(poll_interval=0.1)
    status, out, err = await zimage("a lighthouse at dusk", "-n", "2", "--size", "256X192", "--steps", "6",
                                    "--negative", "blur", "--cfg-scale", "5", "-o", str(tmp_path / "out"),
                                    "--url", proxy.url)
    assert status == 0, err
    paths = out.split()
    assert len(paths) == 2
    for i, path in enumerate(paths):
        assert path.endswith("_%d.png" % i)
        assert Path(path).read_bytes().startswith(b"\x89PNG")
    sent = fake.generate_bodies[0]
    assert (sent["batch_size"], sent["width"], sent["height"], sent["steps"], sent["negative_prompt"],
            sent["cfg_scale"]) == (2, 256, 192, 6, "blur", 5)
    uuid = Path(paths[0]).name.rsplit("_", 1)[0]
    assert "task %s: processing" % uuid in err  # a plain line per change when stderr is not a terminal
    assert len({line for line in err.splitlines() if line.startswith("task %s: " % uuid)}) >= 2, err
    assert "Traceback" not in err


@pytest.mark.gen_test(timeout=60)
async def test_a_terminal_gets_a_progress_bar(make_proxy, fake, tmp_path):
    fake.reads_to_complete = 4
    proxy = make_proxy(poll_interval=0.1)
    status, out, err = await zimage("a red fox", "-o", str(tmp_path), "--url", proxy.url, tty=True)
    assert status == 0, err
    assert "%|" in err and "processing" in err and "100%" in err  # tqdm's bar, with the status
    assert "task " not in err  # not the plain lines


@pytest.mark.gen_test(timeout=60)
async def test_no_wait_then_wait_and_json(make_proxy, fake, tmp_path):
    proxy = make_proxy(poll_interval=0.1)
    status, out, err = await zimage("--no-wait", "a harbour", "--url", proxy.url)
    assert status == 0 and out.strip() in fake.tasks
    uuid = out.strip()
    status, out, err = await zimage("--wait", uuid, "--json", "-o", str(tmp_path), env={"ZIMAGE_URL": proxy.url})
    assert status == 0, err
    answer = json.loads(out)
    assert answer["uuid"] == uuid and answer["status"] == "completed"
    assert (tmp_path / ("%s_0.png" % uuid)).exists()


@pytest.mark.gen_test(timeout=60)
async def test_no_prompt_costs_nothing_and_a_retried_example_pays_once(make_proxy, fake, tmp_path):
    proxy = make_proxy(poll_interval=0.1)
    for args in ((), ("",), ("   ",)):  # nothing to draw: usage, exit 2, no request
        status, _, err = await zimage(*args, "--url", proxy.url, "-o", str(tmp_path))
        assert status == 2 and "prompt" in err and "Traceback" not in err
    assert fake.calls["generate"] == 0 and not proxy.gateway.active
    args = ("--example", "--url", proxy.url + "/v1", "-o", str(tmp_path), "--idempotency-key", "cmd-1")
    first, second = await zimage(*args), await zimage(*args)
    assert first[0] == second[0] == 0 and first[1] == second[1]
    assert fake.calls["generate"] == 1
    assert fake.generate_bodies[0]["prompt"] == "一只站在月球上的猫，超现实主义"


@pytest.mark.gen_test(timeout=60)
async def test_exit_statuses_say_what_went_wrong(make_proxy, fake, tmp_path):
    proxy = make_proxy(poll_interval=0.05, max_attempts=4, api_keys="sk-right")
    key = ("--url", proxy.url, "--api-key", "sk-right", "-o", str(tmp_path))
    bad_args = await zimage("x", "--size", "big", *key)
    assert bad_args[0] == 2 and "--size must look like 1024x768" in bad_args[2]
    assert (await zimage("-n", "many", *key))[0] == 2  # argparse's own
    refused = await zimage("x", "--steps", "0", *key)
    assert refused[0] == 2 and "--steps must be between 1 and 50" in refused[2]
    too_many = await zimage("x", "-n", "9", *key)
    assert too_many[0] == 2 and "-n" in too_many[2] and "batch_size" not in too_many[2]  # the flag typed
    unauthorized = await zimage("x", "--url", proxy.url, "--api-key", "sk-wrong")
    assert unauthorized[0] == 2 and "API key" in unauthorized[2]
    assert "--api-key" in unauthorized[2] and "$ZIMAGE_API_KEY" in unauthorized[2]
    fake.outcome = "fail"
    failed = await zimage("doomed", *key)
    assert failed[0] == 1 and "could not draw this prompt" in failed[2] and "zimage --wait " in failed[2]
    fake.outcome = "never"
    slow = await zimage("slow", *key)
    assert slow[0] == 1 and "zimage --wait " in slow[2]
    fake.outcome = "complete"
    fake.inject("generate", "500")
    broken = await zimage("x", *key)
    assert broken[0] == 3
    for _status, _, err in (bad_args, refused, unauthorized, failed, slow, broken):
        # one line saying what went wrong (after any progress lines), never a traceback
        assert "Traceback" not in err and [line.startswith("zimage: ") for line in err.splitlines()].count(True) == 1


@pytest.mark.gen_test(timeout=60)
async def test_an_unwritable_folder_or_a_short_timeout_costs_no_second_job_and_says_what_to_do(
        make_proxy, fake, tmp_path):
    proxy = make_proxy(poll_interval=0.05, max_attempts=400)
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = await zimage("a lantern", "--url", proxy.url, "-o", str(tmp_path / "a-file" / "pictures"))
    assert unwritable[0] == 2 and "cannot write pictures to" in unwritable[2] and "nothing was submitted" in \
        unwritable[2]
    assert fake.calls["generate"] == 0  # checked before anything was paid for
    fake.outcome = "never"
    timed_out = await zimage("a lantern", "--url", proxy.url, "-o", str(tmp_path), "--timeout", "1")
    assert timed_out[0] == 1, timed_out
    uuid = next(iter(fake.tasks))
    assert "task %s is not finished after 1s" % uuid in timed_out[2] and "zimage --wait %s" % uuid in timed_out[2]
    assert "Traceback" not in timed_out[2] and fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_gateway_that_is_not_there(tmp_path):
    down = "http://127.0.0.1:9"
    status, out, err = await zimage("a fox", "--url", down, "-o", str(tmp_path))
    assert status == 3 and "cannot reach the gateway" in err and "Traceback" not in err
    assert (await zimage("--health", "--url", down))[0] == 3


@pytest.mark.gen_test(timeout=30)
async def test_health(make_proxy):
    proxy = make_proxy()
    status, out, err = await zimage("--health", "--url", proxy.url)
    assert status == 0 and "/health: 200" in out and "/health/ready: 200" in out

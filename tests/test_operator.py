"""The operator's first hour: keys without restarts, `keys add|list|revoke`, logs that name the key,
`usage` that finds the server's database, and a `--help` for people. Real gateway processes."""

import asyncio
import hashlib
import json
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

from helpers import eventually

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}


def bearer(key):
    return {"Authorization": "Bearer %s" % key}


async def submit(gateway, key, **extra):
    return await gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps({**CHAT, **extra}),
                               headers=bearer(key))


async def keyed_gateway(gateways, tmp_path, keys_text, *args):
    """A gateway process started with a TOML keys file of `keys_text`; (the file, the gateway)."""
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_text)
    gateway = gateways("--api_keys_file=%s" % keys, *args)
    await gateway.started()
    return keys, gateway


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "zimage_tornado", *args], capture_output=True, text=True,
                          timeout=30, **kw)


@pytest.mark.parametrize("how", ["sighup", "edit"])
@pytest.mark.gen_test(timeout=60)
async def test_keys_are_added_and_removed_without_a_restart_while_a_waiter_waits(gateways, fake, tmp_path, how):
    keys, gateway = await keyed_gateway(gateways, tmp_path, '[keys.alice]\nkey = "sk-alice"\n',
                                        "--max_attempts=300")  # a wait budget of 30 s
    fake.outcome = "never"
    uuid = json.loads((await submit(gateway, "sk-alice")).body)["choices"][0]["message"]["content"]
    waiting = asyncio.ensure_future(gateway.fetch("/v1/images/%s?timeout=25" % uuid, headers=bearer("sk-alice")))
    assert (await submit(gateway, "sk-bob")).code == 401

    async def change(text):
        keys.write_text(text)
        if how == "sighup":
            gateway.proc.send_signal(signal.SIGHUP)

    await change('[keys.alice]\nkey = "sk-alice"\n[keys.bob]\nkey = "sk-bob"\nimages_per_day = 1\n')
    await eventually(lambda: _code(submit(gateway, "sk-bob"), 200), timeout=6, interval=0.2)
    assert (await submit(gateway, "sk-bob")).code == 429  # its limits apply at once
    await change("[keys\n")  # a broken file keeps the keys in force
    await asyncio.sleep(2.5)
    assert (await submit(gateway, "sk-bob")).code == 429 and "keeping the 2 keys" in gateway.log()
    await change('[keys.bob]\nkey = "sk-bob"\n')  # alice revoked
    await eventually(lambda: _code(submit(gateway, "sk-alice"), 401), timeout=6, interval=0.2)
    fake.tasks[uuid]["outcome"] = "complete"
    answer = await waiting  # the wait that began before any of this still gets its answer
    assert answer.code == 200 and json.loads(answer.body)["image_urls"]
    assert gateway.proc.poll() is None


async def _code(response, code):
    return (await response).code == code


@pytest.mark.gen_test(timeout=60)
async def test_keys_add_prints_a_key_that_works_at_once_and_the_file_keeps_only_its_hash(gateways, fake, tmp_path):
    keys, gateway = await keyed_gateway(gateways, tmp_path,
                                        "# the team's keys\n[keys.ops]\nkey = \"sk-ops\"\nadmin = true\n")
    added = cli("keys", "add", "carol", "--images-per-day", "3", "--file", str(keys))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("sk-") and len(key) >= 40
    text = keys.read_text()
    assert key not in text and hashlib.sha256(key.encode()).hexdigest() in text
    assert text.startswith("# the team's keys\n[keys.ops]")  # comments and order kept
    await eventually(lambda: _code(submit(gateway, key), 200), timeout=6, interval=0.2)
    await eventually(lambda: "key=carol" in gateway.log(), timeout=3)  # the access line names the key

    listed = cli("keys", "list", "--file", str(keys), env={"ZIMAGE_DATABASE": str(gateway.database)})
    assert listed.returncode == 0, listed.stderr
    assert "carol" in listed.stdout and "ops" in listed.stdout and key not in listed.stdout
    carol = next(line for line in listed.stdout.splitlines() if line.startswith("carol"))
    assert carol.split()[-2:] == ["1", "1"]  # today's tasks and images, from the store
    assert cli("keys", "add", "carol", "--file", str(keys)).returncode == 2  # names are unique
    assert cli("keys", "add", "anonymous", "--file", str(keys)).returncode == 2

    revoked = cli("keys", "revoke", "carol", "--file", str(keys))
    assert revoked.returncode == 0 and "carol" not in keys.read_text() and "[keys.ops]" in keys.read_text()
    await eventually(lambda: _code(submit(gateway, key), 401), timeout=6, interval=0.2)


@pytest.mark.gen_test(timeout=30)
async def test_refusals_in_the_log_name_the_key_and_the_reason(gateways, fake, tmp_path):
    keys, gateway = await keyed_gateway(gateways, tmp_path, '[keys.dave]\nkey = "sk-dave"\nimages_per_day = 1\n')
    assert (await submit(gateway, "sk-dave")).code == 200
    assert (await submit(gateway, "sk-dave")).code == 429
    await eventually(lambda: "key dave" in gateway.log() and "insufficient_quota" in gateway.log(), timeout=3)
    assert "sk-dave" not in gateway.log()


@pytest.mark.gen_test(timeout=30)
async def test_usage_finds_the_servers_database_from_any_directory(gateways, fake, tmp_path):
    database = tmp_path / "state" / "usage.sqlite3"
    database.parent.mkdir()
    config = tmp_path / "server.conf"
    config.write_text('database = "%s"\n' % database)
    gateway = gateways(env={"ZIMAGE_DATABASE": str(database)})  # how the server found it does not matter
    await gateway.started()
    assert (await submit(gateway, "any")).code == 200
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = subprocess.run([sys.executable, "-m", "zimage_tornado", "usage", "--config", str(config), "--json"],
                           capture_output=True, text=True, cwd=elsewhere, timeout=30,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.splitlines()[0])["tasks"] == 1
    assert str(database) in shown.stderr  # it says which file it read
    missing = cli("usage", "--database", str(tmp_path / "nope.sqlite3"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_help_is_for_people():
    shown = cli("--help")
    assert shown.returncode == 0
    text = shown.stdout
    assert text.startswith("usage: zimage-tornado") and "site-packages" not in text and "config.py" not in text
    for word in ("usage", "keys", "upstream:", "listening:", "store:", "fleet:", "keys:", "--poll_interval",
                 "(default: 5)"):
        assert word in text, word


def test_a_mistyped_flag_gets_one_line_naming_the_right_one():
    shown = cli("--prot=9000")
    assert shown.returncode == 2
    assert shown.stderr.strip().count("\n") == 0 and "--port" in shown.stderr and not shown.stdout


@pytest.mark.gen_test(timeout=60)
async def test_every_worker_takes_a_new_key_on_sighup(gateways, fake, tmp_path):
    keys, gateway = await keyed_gateway(gateways, tmp_path, '[keys.alice]\nkey = "sk-alice"\n', "--processes=2")
    await eventually(lambda: gateway.log().count(" listening on ") == 2, timeout=30)
    keys.write_text('[keys.alice]\nkey = "sk-alice"\n[keys.erin]\nkey = "sk-erin"\n')
    gateway.proc.send_signal(signal.SIGHUP)  # to the supervisor, which passes it on
    await eventually(lambda: gateway.log().count("keys: reloaded (SIGHUP)") == 2, timeout=30)
    codes = [(await gateway.fetch("/v1/models", headers=bearer("sk-erin"))).code for _ in range(20)]
    assert codes == [200] * 20  # whichever worker answers

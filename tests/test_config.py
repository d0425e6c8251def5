"""Settings from flags, a config file and ZIMAGE_* variables; the command line itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zimage_tornado.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_spec_defaults():
    s = load_settings(["zimage-tornado"], {})
    assert (s.port, s.upstream_url, s.poll_interval, s.max_attempts, s.upstream_timeout) == (
        8000, "https://zimage.run", 5.0, 60, 30.0)
    assert s.wait_budget == 300


def test_precedence_file_then_environment_then_flags(tmp_path):
    config = tmp_path / "zimage.conf"
    config.write_text("port = 7001\npoll_interval = 2.5\nmax_attempts = 7\nmax_batch_size = 8\n")
    s = load_settings(["z", "--config=%s" % config, "--max-attempts=9"],
                      {"ZIMAGE_POLL_INTERVAL": "1.5", "ZIMAGE_PORT": "7002", "OTHER": "x"})
    assert s.max_batch_size == 8  # file
    assert s.port == 7002  # environment beats file
    assert s.poll_interval == 1.5
    assert s.max_attempts == 9  # flag beats file
    assert s.limits.max_batch_size == 8


def test_flags_for_booleans_and_aliases():
    assert load_settings(["z", "--chat-wait"], {}).chat_wait is True
    assert load_settings(["z"], {"ZIMAGE_CHAT_WAIT": "false"}).chat_wait is False
    assert load_settings(["z"], {"ZIMAGE_CHAT_WAIT": "true"}).chat_wait is True
    s = load_settings(["z", "--model-aliases=dall-e-3=turbo, gpt-image-1 = base"], {})
    assert s.aliases == {"dall-e-3": "turbo", "gpt-image-1": "base"}


def test_a_value_may_follow_its_flag_as_the_help_says(tmp_path):
    config = tmp_path / "zimage.conf"
    config.write_text("poll_interval = 2\n")
    s = load_settings(["z", "--port", "18777", "--demo", "--config", str(config), "--max_attempts", "9"], {})
    assert (s.port, s.demo, s.poll_interval, s.max_attempts) == (18777, True, 2, 9)
    # a bare boolean is true and takes no value; the next flag is not taken as a value either
    with pytest.raises(ValueError, match="stray"):
        load_settings(["z", "--demo", "stray"], {})
    with pytest.raises(ValueError, match="port"):
        load_settings(["z", "--port", "--demo"], {})


def test_config_file_from_the_environment(tmp_path):
    config = tmp_path / "zimage.conf"
    config.write_text("upstream_url = 'http://127.0.0.1:1234'\n")
    assert load_settings(["z"], {"ZIMAGE_CONFIG": str(config)}).upstream_url == "http://127.0.0.1:1234"


@pytest.mark.parametrize("argv,env", [
    (["z", "--port=abc"], {}),
    (["z", "--poll-interval=0"], {}),
    (["z", "--no-such-flag=1"], {}),
    (["z", "stray"], {}),
    (["z"], {"ZIMAGE_MAX_ATTEMPTS": "-1"}),
    (["z", "--upstream-url=ftp://x"], {}),
    (["z", "--config=/nonexistent/zimage.conf"], {}),
    (["z", "--model-aliases=dall-e-3"], {}),
    (["z", "--upstream-client=requests"], {}),
    (["z", "--upstream-ca-certs=/nonexistent/ca.pem"], {}),
    (["z", "--event-loop=trio"], {}),
    (["z"], {"ZIMAGE_WEBHOOK_SECRET": "not-a-secret"}),
])
def test_bad_settings_are_refused_with_a_message(argv, env):
    with pytest.raises(ValueError):
        load_settings(argv, env)


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, "-m", "zimage_tornado", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0
    text = result.stdout + result.stderr
    for name in Settings.__dataclass_fields__:
        assert "--" + name in text or "--" + name.replace("_", "-") in text, name


def test_bad_flag_exits_2_with_a_message():
    result = subprocess.run([sys.executable, "-m", "zimage_tornado", "--port=abc"], capture_output=True,
                            text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert "zimage-tornado:" in result.stderr and "Traceback" not in result.stderr


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "zimage-tornado").exists()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_module_starts_serves_logs_and_stops_on_sigterm(gateways, fake, event_loop):
    gateway = gateways(env={"ZIMAGE_POLL_INTERVAL": "0.05", "ZIMAGE_EVENT_LOOP": event_loop})
    health = await gateway.started()
    assert health.code == 200
    submit = await gateway.fetch("/v1/chat/completions", method="POST",
                                 body='{"model": "zimage-turbo", "prompt": "a fox"}')
    assert b"chatcmpl-" in submit.body
    task_uuid = json.loads(submit.body)["choices"][0]["message"]["content"]
    images = await gateway.fetch("/v1/images/" + task_uuid)
    assert images.code == 200
    assert await gateway.stopped() == 0
    stderr = gateway.log()
    assert "listening on http://127.0.0.1:%d" % gateway.port in stderr
    # auto: uvloop, which requirements.txt installs; asyncio: the standard loop, kept working
    assert "(%s loop)" % ("uvloop" if event_loop == "auto" else "asyncio") in stderr
    assert "POST /v1/chat/completions (127.0.0.1) key=anonymous task=%s " % task_uuid in stderr  # the access line
    assert "task %s is completed" % task_uuid in stderr
    assert "Traceback" not in stderr

"""Settings: one frozen dataclass, built from tornado.options.

Each field is a command-line flag (`--poll-interval 2`), a line of the `--config` file
(Python syntax: `poll_interval = 2`) and a `ZIMAGE_POLL_INTERVAL` environment variable.
Precedence, lowest first: defaults, config file, environment, command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

from zimage_tornado import frontends
from zimage_tornado.signing import parse_secrets
from zimage_tornado.validation import Limits

ENV_PREFIX = "ZIMAGE_"


def setting(default, help: str):  # noqa: A002 - mirrors tornado's define(help=...)
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    address: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8000, "Port to listen on")
    backlog: int = setting(0, "Pending connections the kernel may queue before accept; 0: the kernel's limit "
                              "(net.core.somaxconn, read at start)")
    upstream_url: str = setting("https://zimage.run", "Base URL of the Z-Image service")
    upstream_api_key: str = setting("", "A credential for the upstream, sent as Authorization: Bearer on its API "
                                        "calls and never logged (the public service checks none)")
    upstream_protocol: str = setting("auto", "How submits are written: flat (the original snake_case fields), camel "
                                             "(modelType, batchSize, and the moderation step when the service asks "
                                             "for it), or auto (flat until the service asks for camelCase)")
    upstream_cookie_env: str = setting("", "The name of an environment variable holding a session cookie of your own "
                                           "with the upstream (sent as Cookie on its API calls, never logged): for a "
                                           "service that puts anonymous server calls behind a browser check")
    upstream_timeout: float = setting(30.0, "Seconds for a whole upstream call, queueing included")
    upstream_connect_timeout: float = setting(10.0, "Seconds to connect to the upstream")
    upstream_max_clients: int = setting(100, "Upstream calls in flight at once; more wait in a queue")
    upstream_client: str = setting("pooled", "HTTP client for the upstream API: pooled (kept-alive "
                                                   "connections), curl (pycurl) or simple (one connection a call)")
    upstream_ca_certs: str = setting("", "CA bundle to verify the upstream's TLS certificate (default: the system's)")
    poll_interval: float = setting(5.0, "Seconds between upstream status checks while a client waits")
    max_attempts: int = setting(60, "Status checks in a full wait: a wait lasts max_attempts x poll_interval")
    max_waiters: int = setting(10000, "Clients that may wait on tasks at once; more get 503")
    cache_size: int = setting(10000, "Finished tasks remembered, answered without an upstream call")
    cache_ttl: float = setting(3600.0, "Seconds a finished task is remembered")
    max_batch_size: int = setting(4, "Largest batch_size accepted")
    min_size: int = setting(64, "Smallest width or height accepted")
    max_size: int = setting(2048, "Largest width or height accepted")
    size_multiple: int = setting(16, "width and height must be multiples of this (1 to accept any)")
    max_steps: int = setting(50, "Largest steps accepted")
    max_cfg_scale: float = setting(20.0, "Largest cfg_scale accepted")
    max_prompt_length: int = setting(8000, "Longest prompt or negative_prompt accepted, in characters")
    stream_heartbeat: float = setting(10.0, "Seconds between keep-alive comments of an event stream while its task "
                                            "runs, whatever poll_interval is (proxies cut streams idle for long)")
    follow_budget: float = setting(3600.0, "Seconds a task nobody waits on is still followed, so that its record "
                                           "learns how it ended; then it is recorded as expired (0: not followed)")
    follow_interval: float = setting(60.0, "Seconds between status reads of a followed task nobody waits on, once "
                                           "a full wait budget has passed since its submit")
    ignore_image_parts: bool = setting(False, "Chat: drop a message's image parts instead of refusing them with 400 "
                                              "(for front-ends that attach images by habit)")
    answer_housekeeping: bool = setting(True, "Chat: answer front-ends' housekeeping prompts (Open WebUI's title, "
                                              "tags, follow-ups, queries, image prompt...) and their 'image created' "
                                              "follow-ups at once, never as an image job, in every wait mode")
    image_tools: str = setting("", "Chat: more function-tool names (comma-separated) that make pictures, besides "
                                   "generate_image, image_generation and create_image: a request offering one is "
                                   "answered with a call of it")
    chat_progress: str = setting("reasoning", "Chat in wait mode, streamed: where progress lines go: reasoning "
                                              "(delta.reasoning_content, shown apart and not kept in the answer), "
                                              "content (in the message, for clients that show only content) or none")
    chat_wait: bool = setting(False, "Chat completions wait for the pictures and answer markdown images")
    model_aliases: str = setting("", "Model name aliases, e.g. 'dall-e-3=turbo,gpt-image-1=turbo'")
    idempotency_ttl: float = setting(86400.0, "Seconds an Idempotency-Key keeps returning the same task")
    max_image_bytes: int = setting(20 * 1024 * 1024, "Largest image fetched for b64_json answers, in bytes")
    image_hosts: str = setting("", "Comma-separated origins (https://cdn.example.com) b64_json images may come from "
                                   "besides the upstream's own, even at non-public addresses")
    image_fetches: int = setting(8, "Image downloads in flight at once, over all requests (their own pool)")
    image_cache_bytes: int = setting(64 * 1024 * 1024, "Bytes of base64 answers kept, so that repeated b64_json "
                                                         "answers for a task share one download")
    processes: int = setting(1, "Worker processes sharing the listening socket (0: one per CPU core)")
    event_loop: str = setting("auto", "The asyncio event loop: uvloop (less CPU per request), asyncio (the standard "
                                      "one), or auto (uvloop when installed)")
    shutdown_timeout: float = setting(10.0, "Seconds a SIGTERM/SIGINT shutdown may take before the process exits")
    idle_timeout: float = setting(60.0, "Seconds a client connection may idle, or take to send its headers")
    body_timeout: float = setting(30.0, "Seconds a client may take to send a request body")
    write_timeout: float = setting(60.0, "Seconds a client may take to read an answer (or a stream event)")
    max_body_bytes: int = setting(1024 * 1024, "Largest request body accepted, in bytes (more: 413)")
    api_keys: str = setting("", "Comma-separated API keys, each named key- and the first 8 hex digits of its "
                                "SHA-256; when set (or api_keys_file), /v1/* needs one")
    api_keys_file: str = setting("", "File of API keys: one per line ('#' starts a comment), or TOML (*.toml) with "
                                     "named keys, limits and admins")
    task_visibility: str = setting("owner", "With keys: owner (a task is read by the key that submitted it, and "
                                            "admins) or any")
    ip_requests_per_minute: int = setting(0, "Without keys: submits per minute per client address (0: unlimited)")
    ip_images_per_day: int = setting(0, "Without keys: images per UTC day per client address (0: unlimited)")
    ip_max_waiters: int = setting(0, "Without keys: clients waiting on tasks at once per client address (0: unlimited)")
    database: str = setting("zimage-tornado.sqlite3", "SQLite file of the usage record, quotas, ownership and "
                                                      "idempotency keys (':memory:' keeps nothing)")
    record_prompts: bool = setting(True, "Keep prompts in the usage record")
    pictures: str = setting("keep", "keep: every finished task's pictures are fetched once and kept by the gateway, "
                                    "whose own signed links answers give; link: answers give the provider's links "
                                    "and nothing is kept")
    pictures_dir: str = setting("", "Directory of kept pictures (default: pictures/ beside the database file; "
                                    "with database :memory:, a temporary directory removed at exit)")
    pictures_max_bytes: int = setting(10 * 2 ** 30, "Bytes of kept pictures; past it the oldest are removed "
                                                    "(answered 410 picture_expired) (0: no budget)")
    pictures_ttl: float = setting(30 * 86400.0, "Seconds a kept picture is served; then removed, and answered 410 "
                                                "picture_expired (0: kept until the budget needs room)")
    pictures_s3_url: str = setting("", "Keep pictures in an S3-compatible bucket instead of pictures_dir, so that "
                                       "every instance of a fleet serves every picture: s3://bucket/prefix "
                                       "(credentials: the standard AWS environment variables or credentials file)")
    pictures_s3_endpoint: str = setting("https://s3.amazonaws.com", "The S3-compatible server of pictures_s3_url "
                                                                    "(R2, MinIO, Ceph, rclone: http(s)://host:port)")
    pictures_s3_region: str = setting("", "The bucket's region, if the server needs one named (AWS: us-east-1...)")
    public_url: str = setting("", "This gateway's address as clients reach it (https://images.example.com), for the "
                                  "links in answers; default: each request's scheme and host (X-Forwarded-Proto and "
                                  "-Host believed from trusted_proxies only)")
    link_secret: str = setting("", "Secret that signs picture links (at least 32 characters); default: one generated "
                                   "once and kept in the store, so that a fleet agrees")
    link_ttl: float = setting(7 * 86400.0, "Seconds a signed picture link works")
    record_ttl: float = setting(90 * 86400.0, "Seconds a task's usage row is kept")
    redis_url: str = setting("", "Redis for a fleet (redis://[:password@]host:6379/0, rediss://...): shared limits, "
                                 "idempotency, ownership, usage, and one upstream read per task per interval")
    redis_timeout: float = setting(1.0, "Seconds any one Redis call may take, waiting for a connection included")
    redis_connections: int = setting(32, "Redis connections per instance for the store, and as many for polling "
                                         "(plus one for pub/sub); more calls wait for one")
    metrics_public: bool = setting(False, "With keys configured, GET /metrics answers anyone (by default it needs "
                                          "an admin key)")
    metrics_port: int = setting(0, "Serve GET /metrics on a listener of its own, without keys (0: none; "
                                   "then the main port serves it)")
    metrics_address: str = setting("127.0.0.1", "Address of the metrics_port listener")
    reads_per_minute: int = setting(600, "Task reads and picture downloads per minute per key, unless the keys file "
                                         "says otherwise (0: unlimited)")
    ip_reads_per_minute: int = setting(600, "Without keys: task reads and picture downloads per minute per client "
                                            "network (0: unlimited)")
    ip_v4_prefix: int = setting(32, "Per-address limits count IPv4 clients by this network prefix")
    ip_v6_prefix: int = setting(64, "Per-address limits count IPv6 clients by this network prefix (a host has a "
                                    "/64 to rotate addresses in)")
    upstream_reads_per_second: int = setting(20, "Status reads of the upstream per second, for all tasks of this "
                                                 "instance (of the fleet with redis_url); more wait their turn "
                                                 "(0: unlimited)")
    webhook_secret: str = setting("", "Secret that signs webhooks (whsec_ and base64; several, space-separated, while "
                                      "rotating); a key's own webhook_secret in the keys file overrides it")
    webhook_hosts: str = setting("", "Comma-separated hosts (host or host:port) webhooks may be sent to even at "
                                     "loopback or private addresses (by default only public addresses)")
    webhook_max_attempts: int = setting(8, "Attempts to deliver a webhook message before it is given up")
    webhook_retry_delays: str = setting("5,300,1800,7200,18000,36000,36000",
                                        "Seconds before each retry of a webhook message (the Standard Webhooks "
                                        "schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), each with up to "
                                        "10% jitter; the last one repeats")
    webhook_timeout: float = setting(15.0, "Seconds one webhook attempt may take (redirects are not followed)")
    webhook_deliveries: int = setting(64, "Webhook attempts in flight at once (their own connection pool)")
    trusted_proxies: str = setting("", "Comma-separated IPs/CIDRs whose X-Forwarded-For / X-Real-IP is believed")
    cors_origins: str = setting("", "Comma-separated browser origins allowed by CORS, or '*' (default: none)")
    demo: bool = setting(False, "Start a built-in simulated Z-Image service on loopback and use it as the upstream")
    demo_seconds: float = setting(4.0, "With --demo: seconds a simulated task takes from submit to pictures")
    log_level: str = setting("info", "Log level: debug, info, warning or error")
    log_format: str = setting("text", "Log line format: text or json")

    def __post_init__(self) -> None:
        # parsed now: a bad value raises ValueError at start
        _ = self.aliases, self.proxy_networks, self.image_origins, self.webhook_secrets, self.retry_delays
        _ = self.webhook_allowed
        if self.processes < 0 or self.log_format not in ("text", "json"):
            raise ValueError("processes must be 0 or more, log_format text or json")
        if not 1 <= self.port <= 65535:
            raise ValueError("port must be between 1 and 65535")
        if self.backlog < 0:
            raise ValueError("backlog must be 0 (the kernel's limit) or more")
        positive = ("upstream_timeout", "upstream_connect_timeout", "upstream_max_clients",
                    "poll_interval", "max_attempts", "max_waiters", "cache_ttl", "max_batch_size", "min_size",
                    "size_multiple", "max_steps", "max_prompt_length", "idempotency_ttl", "max_image_bytes",
                    "image_fetches", "record_ttl", "redis_timeout", "redis_connections",
                    "shutdown_timeout", "idle_timeout", "body_timeout", "write_timeout", "max_body_bytes",
                    "demo_seconds", "stream_heartbeat", "webhook_max_attempts", "webhook_timeout", "webhook_deliveries")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError("%s must be positive" % name)
        if self.follow_budget < 0 or self.follow_interval <= 0:
            raise ValueError("follow_budget must be 0 or more, follow_interval positive")
        if self.cache_size < 0 or self.max_cfg_scale < 0 or self.image_cache_bytes < 0:
            raise ValueError("cache_size and max_cfg_scale must not be negative")
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if not self.upstream_url.startswith(("http://", "https://")):
            raise ValueError("upstream_url must be an http:// or https:// URL")
        if self.upstream_ca_certs and not os.path.isfile(self.upstream_ca_certs):
            # A typo here must not quietly fall back to the system's CAs.
            raise ValueError("upstream_ca_certs: no such file: %s" % self.upstream_ca_certs)
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError("event_loop must be auto, asyncio or uvloop")
        if self.upstream_client not in ("pooled", "curl", "simple"):
            raise ValueError("upstream_client must be pooled, curl or simple")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")
        if not 0 <= self.ip_v4_prefix <= 32 or not 0 <= self.ip_v6_prefix <= 128:
            raise ValueError("ip_v4_prefix must be 0 to 32, ip_v6_prefix 0 to 128")
        if min(self.reads_per_minute, self.ip_reads_per_minute, self.upstream_reads_per_second) < 0:
            raise ValueError("reads_per_minute, ip_reads_per_minute and upstream_reads_per_second must be 0 or more")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be between 0 and 65535")
        if not self.database.strip():
            raise ValueError("database must name a file (or :memory:)")
        if self.task_visibility not in ("owner", "any"):
            raise ValueError("task_visibility must be owner or any")
        if min(self.ip_requests_per_minute, self.ip_images_per_day, self.ip_max_waiters) < 0:
            raise ValueError("ip_requests_per_minute, ip_images_per_day and ip_max_waiters must be 0 or more")
        if self.chat_progress not in ("reasoning", "content", "none"):
            raise ValueError("chat_progress must be reasoning, content or none")
        if self.upstream_protocol not in ("auto", "flat", "camel"):
            raise ValueError("upstream_protocol must be auto, flat or camel")
        if self.upstream_cookie_env and not os.environ.get(self.upstream_cookie_env):
            raise ValueError("upstream_cookie_env names %s, which is not set in the environment"
                             % self.upstream_cookie_env[:100])
        if self.pictures not in ("keep", "link"):
            raise ValueError("pictures must be keep or link")
        if self.pictures_max_bytes < 0 or self.pictures_ttl < 0 or self.link_ttl <= 0:
            raise ValueError("pictures_max_bytes and pictures_ttl must be 0 or more, link_ttl positive")
        if self.pictures_s3_url:
            from zimage_tornado.pictures.s3 import parse_bucket_url, parse_endpoint
            parse_bucket_url(self.pictures_s3_url)
            parse_endpoint(self.pictures_s3_endpoint)
        if self.link_secret and len(self.link_secret) < 32:
            raise ValueError("link_secret must be at least 32 characters (or unset: one is generated)")
        if self.public_url and (not self.public_url.startswith(("http://", "https://"))
                                or any(c in self.public_url for c in "?# ")):
            raise ValueError("public_url must be an http:// or https:// URL without a query, e.g. "
                             "https://images.example.com")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")

    # The derived values below are read on every request: each is computed once.
    @functools.cached_property
    def limits(self) -> Limits:
        names = {f.name for f in dataclasses.fields(Limits)} - {"image_tools"}
        tools = frozenset(item.strip() for item in self.image_tools.split(",") if item.strip())
        return Limits(**{name: getattr(self, name) for name in names}, image_tools=frontends.IMAGE_TOOLS_SET | tools)

    @functools.cached_property
    def aliases(self) -> dict[str, str]:
        pairs = [item.strip() for item in self.model_aliases.split(",") if item.strip()]
        table = {}
        for pair in pairs:
            name, sep, target = (part.strip() for part in pair.partition("="))
            if not sep or not name or not target:
                raise ValueError("model_aliases: expected name=upstream_model, got %r" % pair)
            table[name] = target
        return table

    @functools.cached_property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(item.strip(), strict=False)
                         for item in self.trusted_proxies.split(",") if item.strip())
        except ValueError as e:
            raise ValueError("trusted_proxies: %s" % e) from None

    @functools.cached_property
    def origins(self) -> frozenset[str]:
        return frozenset(item.strip() for item in self.cors_origins.split(",") if item.strip())

    @functools.cached_property
    def image_origins(self) -> tuple[str, ...]:
        origins = tuple(item.strip() for item in self.image_hosts.split(",") if item.strip())
        for origin in origins:
            if not origin.lower().startswith(("http://", "https://")):
                raise ValueError("image_hosts: expected origins like https://cdn.example.com, got %r" % origin)
        return origins

    @functools.cached_property
    def webhook_secrets(self) -> tuple[bytes, ...]:
        return parse_secrets(self.webhook_secret, "webhook_secret")

    @functools.cached_property
    def retry_delays(self) -> tuple[float, ...]:
        try:
            delays = tuple(float(item) for item in self.webhook_retry_delays.split(",") if item.strip())
        except ValueError:
            delays = ()
        if not delays or min(delays) < 0:
            raise ValueError("webhook_retry_delays: expected comma-separated seconds, e.g. 5,300,1800")
        return delays

    @functools.cached_property
    def webhook_allowed(self) -> frozenset[str]:
        """webhook_hosts as lowercase `host` and `host:port` words."""
        hosts = frozenset(item.strip().lower() for item in self.webhook_hosts.split(",") if item.strip())
        for host in hosts:
            if "/" in host or " " in host:
                raise ValueError("webhook_hosts: expected host or host:port, got %r" % host[:100])
        return hosts

    @property
    def workers(self) -> int:
        """The worker processes that will serve (--demo runs one)."""
        return 1 if self.demo else self.processes or os.cpu_count() or 1

    @property
    def listen_backlog(self) -> int:
        return self.backlog or kernel_somaxconn()

    @property
    def pictures_path(self) -> str | None:
        """Where kept pictures go; None: a temporary directory (the database keeps nothing either)."""
        if self.pictures_dir:
            return self.pictures_dir
        if self.database == ":memory:":
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.database)), "pictures")

    @property
    def wait_budget(self) -> float:
        """A full wait: max_attempts status checks, one every poll_interval."""
        return self.poll_interval * self.max_attempts


def kernel_somaxconn(default: int = 1024) -> int:
    """The kernel's cap on a listening socket's queue: a larger backlog is cut to it, a smaller
    one makes a burst of connections wait on SYN retries (a second or more each)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def convert(name: str, value: str) -> object:
    """A command-line or environment value as its setting's type, or a ValueError naming it."""
    kind = type(SETTING_DEFAULTS[name])
    try:
        if kind is bool:
            return BOOLEANS[value.strip().lower()]
        return int(value) if kind is int else float(value) if kind is float else value
    except (KeyError, ValueError):
        expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "a value")
        raise ValueError("%s: expected %s, got %r" % (name, expected, value[:100])) from None


def checked(args: Sequence[str]) -> list[str]:
    """`--name=value` arguments with each value checked, and booleans spelled as tornado reads
    them (it takes any word but false/0/f as true, so "no" would be true). `--name value` is
    joined into `--name=value` (as most command lines take it), except for a boolean, whose
    bare `--name` means true."""
    result = []
    pending = list(args)
    while pending:
        arg = pending.pop(0)
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        takes_value = name == "config" or (name in SETTING_DEFAULTS and not isinstance(SETTING_DEFAULTS[name], bool))
        if not sep and takes_value and pending and not pending[0].startswith("--"):
            value, sep = pending.pop(0), "="
            arg = "--%s=%s" % (name, value)
        if arg.startswith("--") and name not in SETTING_DEFAULTS and name not in ("config", "help"):
            guess = closest(name)
            raise ValueError("unknown setting --%s%s" % (name[:60], "; did you mean --%s?" % guess if guess else
                                                            " (zimage-tornado --help lists them)"))
        if sep and name in SETTING_DEFAULTS:
            converted = convert(name, value)
            arg = "--%s=%s" % (name, str(converted).lower() if isinstance(converted, bool) else value)
        result.append(arg)
    return result


def server_settings(config: str | None = None, env_file: str | None = None,
                    environ: Mapping[str, str] | None = None) -> Settings:
    """The settings a server started the same way would have: its --config file, its environment
    (ZIMAGE_*), and a systemd EnvironmentFile, for the subcommands that read its state."""
    environment = dict(os.environ if environ is None else environ)
    if env_file:
        with open(env_file, encoding="utf-8") as f:
            for line in f:
                name, sep, value = line.strip().partition("=")
                if sep and not name.startswith("#"):
                    environment[name.strip()] = value.strip().strip('"')
    return load_settings(["zimage-tornado", *(["--config=%s" % config] if config else [])], environment)


# The settings by concern: --help and docs/configuration.md list them this way.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Upstream", ("upstream_url", "upstream_api_key", "upstream_protocol", "upstream_cookie_env", "upstream_timeout",
                  "upstream_connect_timeout",
                  "upstream_reads_per_second",
                  "upstream_max_clients", "upstream_client", "upstream_ca_certs", "model_aliases", "image_hosts",
                  "image_fetches", "max_image_bytes", "image_cache_bytes")),
    ("Listening", ("address", "port", "backlog", "processes", "event_loop", "shutdown_timeout", "idle_timeout",
                   "body_timeout", "write_timeout", "trusted_proxies", "cors_origins")),
    ("Waiting and following tasks", ("poll_interval", "max_attempts", "max_waiters", "cache_size", "cache_ttl",
                                     "follow_budget", "follow_interval", "stream_heartbeat", "chat_wait",
                                     "chat_progress", "answer_housekeeping", "image_tools", "ignore_image_parts")),
    ("Requests and limits", ("max_batch_size", "min_size", "max_size", "size_multiple", "max_steps",
                             "max_cfg_scale", "max_prompt_length", "max_body_bytes", "idempotency_ttl",
                             "ip_requests_per_minute", "ip_images_per_day", "ip_max_waiters", "ip_reads_per_minute",
                             "ip_v4_prefix", "ip_v6_prefix")),
    ("Keys", ("api_keys", "api_keys_file", "task_visibility", "reads_per_minute", "metrics_public", "metrics_port",
              "metrics_address")),
    ("Store", ("database", "record_prompts", "record_ttl")),
    ("Pictures", ("pictures", "pictures_dir", "pictures_max_bytes", "pictures_ttl", "pictures_s3_url",
                  "pictures_s3_endpoint", "pictures_s3_region", "public_url", "link_secret", "link_ttl")),
    ("Webhooks", ("webhook_secret", "webhook_hosts", "webhook_max_attempts", "webhook_retry_delays",
                  "webhook_timeout", "webhook_deliveries")),
    ("Fleet", ("redis_url", "redis_timeout", "redis_connections")),
    ("Logs and demo", ("log_level", "log_format", "demo", "demo_seconds")),
)
SUBCOMMANDS = (
    ("usage", "per-key usage from the database the server uses (zimage-tornado usage --help)"),
    ("keys", "add, list or revoke API keys in the keys file (zimage-tornado keys --help)"),
    ("pictures", "the kept pictures: gc applies pictures_ttl and pictures_max_bytes now, stats shows them"),
)


def shown(value: object) -> str:
    """A default as a person writes it on the command line."""
    if isinstance(value, bool):
        return shown_value(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else "(none)"


def help_text() -> str:
    """`zimage-tornado --help`: what it is, its subcommands, and the settings by concern."""
    lines = ["usage: zimage-tornado [--name=value ...] [--config=FILE]",
             "       zimage-tornado usage|keys|pictures ...", "",
             "An OpenAI-compatible gateway for the Z-Image text-to-image service.", "", "subcommands:"]
    lines += ["  %-8s %s" % item for item in SUBCOMMANDS]
    lines += ["", "Every setting is --name=value (or --name value), a line `name = value` of the --config file, or "
              "ZIMAGE_NAME=value.", "Precedence, lowest first: defaults, config file, environment, command line."]
    for title, names in GROUPS:
        lines += ["", "%s:" % title.lower()]
        for name in names:
            lines.append("  --%-26s %s (default: %s)" % (name, HELP[name], shown(SETTING_DEFAULTS[name])))
    lines += ["", "  --%-26s %s" % ("config", "A file of settings, Python syntax: poll_interval = 2"),
              "  --%-26s %s" % ("help", "This text")]
    return "\n".join(lines)


def reference() -> str:
    """docs/configuration.md, generated from Settings so that it cannot drift:
    `python -m zimage_tornado.config > docs/configuration.md`."""
    lines = ["# Configuration", "", "<!-- Generated by `python -m zimage_tornado.config`; "
             "tests/test_docs.py checks that it matches the code. -->", "",
             "Every setting is a flag (`--poll-interval=2`, `--poll-interval 2` or `--poll_interval=2`), "
             "a line in a config file given "
             "with `--config` (Python syntax: `poll_interval = 2`), and an environment variable "
             "(`ZIMAGE_POLL_INTERVAL=2`). Lowest precedence first: defaults, config file, environment, flags. "
             "A bad value stops the server at start with a one-line message naming the setting (exit status 2); "
             "booleans are `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`). `zimage-tornado --help` "
             "prints the same list."]
    for title, names in GROUPS:
        lines += ["", "## %s" % title, "", "| Setting | Default | Meaning |", "|---|---|---|"]
        lines += ["| `%s` | `%s` | %s |" % (name, shown(SETTING_DEFAULTS[name]), HELP[name].replace("|", "\\|"))
                  for name in names]
    return "\n".join(lines) + "\n"


def closest(name: str) -> str | None:
    known = [*SETTING_DEFAULTS, "config", "help"]
    found = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return found[0] if found else None


def file_args(path: str) -> list[str]:
    """A config file's settings as `--name=value` arguments, so that they are checked and
    converted like flags (`poll_interval = 2` is a float of 2; tornado's own reader refuses an
    int there). Other names in the file (helper variables) are left alone, as tornado does."""
    with open(path, "rb") as f:
        namespace: dict[str, Any] = {"__file__": os.path.abspath(path)}
        exec(compile(f.read(), path, "exec"), namespace)  # the file is the operator's own, as in tornado
    return ["--%s=%s" % (name, shown_value(value)) for name, value in namespace.items()
            if name in SETTING_DEFAULTS]


def shown_value(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def build_parser() -> OptionParser:
    parser = OptionParser()
    for f in dataclasses.fields(Settings):
        parser.define(f.name, default=f.default, type=type(f.default), help=f.metadata["help"])
    parser.define("config", type=str, default=None, help="Path of a config file (Python syntax: name = value)")
    return parser


def load_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a command line (argv[0] is the program name) and the environment.

    Raises ValueError with a message for the user on a bad flag, file or value."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    names = {name.replace("-", "_") for name in parser}
    from_env = ["--%s=%s" % (key[len(ENV_PREFIX):].lower(), value) for key, value in sorted(environ.items())
                if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in names]
    # Checked here: tornado's own conversion errors do not say which setting they are about.
    args = [argv[0], *checked([*from_env, *argv[1:]])]
    try:
        extra = parser.parse_command_line(args, final=False)
        if extra:
            raise ValueError("unexpected argument %r (settings are given as --name=value)" % extra[0])
        if parser.config:
            from_file = checked(file_args(parser.config))
            parser = build_parser()  # the file first, then the environment and flags over it
            parser.parse_command_line([argv[0], *from_file, *args[1:]], final=False)
    except (OptionsError, OSError, SyntaxError) as e:
        raise ValueError(str(e)) from e
    return Settings(**{f.name: getattr(parser, f.name) for f in dataclasses.fields(Settings)})


SETTING_DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(Settings)}
HELP: dict[str, str] = {f.name: f.metadata["help"] for f in dataclasses.fields(Settings)}

if __name__ == "__main__":
    print(reference(), end="")

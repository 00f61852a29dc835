"""Settings: defaults, the shipped file, precedence, and errors that name key and source."""

import dataclasses
import pickle
import tomllib
from pathlib import Path

import pytest

from supervisor.settings import (
    ApiSettings,
    BackoffSettings,
    ConfigError,
    LogSettings,
    MetricsSettings,
    Settings,
    load_settings,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "supervisor.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "supervisor.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_from(
    *,
    config_path: str | None = None,
    environ: dict[str, str] | None = None,
    flags: dict[str, object] | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=config_path, environ=environ or {}, flags=flags)
    return caught.value


# --- Defaults and the shipped file -------------------------------------------------------


def test_defaults() -> None:
    """With no file, no environment and no flags, every value is the documented default."""
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.docker.host == ""
    assert settings.docker.candidates[0] == "/var/run/docker.sock"
    assert settings.backoff == BackoffSettings(0.5, 2.0, 30.0, 30.0)
    assert settings.watch.socket_poll_seconds == 0.25
    assert settings.api.socket == "/run/homelabarr/supervisor.sock"
    assert settings.api.mode == 0o660
    assert settings.metrics.listen == "127.0.0.1:9856"
    assert settings.metrics.address == ("127.0.0.1", 9856)
    assert settings.log == LogSettings("INFO", "text")
    assert set(settings.sources().values()) == {"default"}


def test_shipped_file_equals_defaults() -> None:
    """config/supervisor.toml loads to exactly Settings()."""
    settings = load_settings(config_path=str(SHIPPED), environ={})
    assert settings == Settings()


def test_shipped_file_lists_every_key() -> None:
    """The shipped file sets every key of every section, so it documents them all."""
    document = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    in_file = {f"{section}.{key}" for section, table in document.items() for key in table}
    assert in_file == set(Settings().sources())


def test_shipped_file_comments_every_key() -> None:
    """Each key in the shipped file has a comment line just above it."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if line and line[0].isalpha() and "=" in line:
            assert lines[number - 1].startswith("#"), f"no comment above line {number + 1}"


def test_settings_is_frozen() -> None:
    """Settings and its sections refuse assignment and are hashable."""
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api = ApiSettings()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api.socket = "/tmp/x"  # type: ignore[misc]
    assert hash(settings) == hash(Settings())


def test_sections_built_in_code_are_checked() -> None:
    """A section built in code is held to the same rules, with source "code"."""
    with pytest.raises(ConfigError) as caught:
        ApiSettings(mode=0o1000)
    assert (caught.value.key, caught.value.source) == ("api.mode", "code")
    assert LogSettings(level="debug").level == "DEBUG"
    assert BackoffSettings(initial_seconds=1).initial_seconds == 1.0
    with pytest.raises(ConfigError, match=r"^backoff\.max_seconds:"):
        BackoffSettings(initial_seconds=5.0, max_seconds=1.0)


# --- Precedence --------------------------------------------------------------------------


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    """Per key, a flag beats the environment, which beats the file, which beats the default."""
    path = write(
        tmp_path,
        '[api]\nsocket = "/file.sock"\nmax_connections = 10\nheartbeat_seconds = 1.5\n'
        "[backoff]\nmax_seconds = 40\n",
    )
    environ = {"SUPERVISOR_API_SOCKET": "/env.sock", "SUPERVISOR_API_MAX_CONNECTIONS": "20"}
    settings = load_settings(
        config_path=path, environ=environ, flags={"api.socket": "/flag.sock", "api.group": None}
    )
    assert settings.api.socket == "/flag.sock"
    assert settings.api.max_connections == 20
    assert settings.api.heartbeat_seconds == 1.5
    assert settings.backoff.max_seconds == 40.0
    assert settings.api.idle_timeout_seconds == 60.0
    sources = settings.sources()
    assert sources["api.socket"] == "flag --socket"
    assert sources["api.max_connections"] == "environment SUPERVISOR_API_MAX_CONNECTIONS"
    assert sources["api.heartbeat_seconds"] == f"{path} line 4"
    assert sources["backoff.max_seconds"] == f"{path} line 6"
    assert sources["api.group"] == "default"


def test_config_path_from_environment(tmp_path: Path) -> None:
    """Without config_path, SUPERVISOR_CONFIG names the file."""
    path = write(tmp_path, '[log]\nformat = "json"\n')
    settings = load_settings(environ={"SUPERVISOR_CONFIG": path})
    assert settings.log.format == "json"


def test_flags_typed_and_named() -> None:
    """Flags accept typed values or strings, and flag_names spells the source."""
    settings = load_settings(
        environ={},
        flags={"metrics.listen": "", "log.level": "debug", "log.format": "json", "api.mode": 0o600},
    )
    assert settings.metrics.listen == ""
    assert settings.metrics.address is None
    assert settings.log == LogSettings("DEBUG", "json")
    assert settings.api.mode == 0o600
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={}, flags={"api.socket": ""}, flag_names={"api.socket": "--api-socket"}
        )
    assert caught.value.source == "flag --api-socket"
    assert "api.socket" in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "flags", "expected"),
    [
        ({}, {}, "unix:///file.sock"),
        ({"DOCKER_HOST": "unix:///docker.sock"}, {}, "unix:///docker.sock"),
        (
            {"DOCKER_HOST": "unix:///docker.sock", "SUPERVISOR_DOCKER_HOST": "tcp://proxy:2375"},
            {},
            "tcp://proxy:2375",
        ),
        (
            {"DOCKER_HOST": "unix:///docker.sock", "SUPERVISOR_DOCKER_HOST": "tcp://proxy:2375"},
            {"docker.host": "unix:///flag.sock"},
            "unix:///flag.sock",
        ),
        ({"DOCKER_HOST": ""}, {}, "unix:///file.sock"),
    ],
)
def test_docker_host_precedence(
    tmp_path: Path, environ: dict[str, str], flags: dict[str, object], expected: str
) -> None:
    """The endpoint: flag > SUPERVISOR_DOCKER_HOST > DOCKER_HOST > file; empty DOCKER_HOST is unset."""
    path = write(tmp_path, '[docker]\nhost = "unix:///file.sock"\n')
    settings = load_settings(config_path=path, environ=environ, flags=flags)
    assert settings.docker.host == expected


def test_docker_tls_variables() -> None:
    """DOCKER_TLS_VERIFY and DOCKER_CERT_PATH apply, below their SUPERVISOR_ twins."""
    on = load_settings(environ={"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/certs"})
    assert (on.docker.tls_verify, on.docker.cert_path) == (True, "/certs")
    assert load_settings(environ={"DOCKER_TLS_VERIFY": "0"}).docker.tls_verify is False
    overridden = load_settings(
        environ={
            "DOCKER_TLS_VERIFY": "1",
            "SUPERVISOR_DOCKER_TLS_VERIFY": "no",
            "DOCKER_CERT_PATH": "/certs",
            "SUPERVISOR_DOCKER_CERT_PATH": "/mine",
        }
    )
    assert (overridden.docker.tls_verify, overridden.docker.cert_path) == (False, "/mine")


def test_bare_socket_path_as_docker_host() -> None:
    """A bare absolute path, as older set-ups put in DOCKER_HOST, is stored as a unix:// URL."""
    settings = load_settings(environ={"DOCKER_HOST": "/var/run/docker.sock"})
    assert settings.docker.host == "unix:///var/run/docker.sock"


def test_docker_host_from_environment_is_checked() -> None:
    """A DOCKER_HOST the supervisor cannot use is an error naming that variable."""
    error = error_from(environ={"DOCKER_HOST": "ssh://user@host"})
    assert (error.key, error.source) == ("docker.host", "environment DOCKER_HOST")


# --- Unknown names -----------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """A misspelt key is an error naming the dotted key, the file and its line."""
    path = write(
        tmp_path, '# settings\n\n[api]\nsocket = "/x.sock"\n\n[docker]\ninspect_concurency = 3\n'
    )
    error = error_from(config_path=path)
    assert error.key == "docker.inspect_concurency"
    assert error.source == f"{path} line 7"
    assert str(error).startswith("docker.inspect_concurency: unknown setting")
    assert "docker.inspect_concurrency" in str(error)
    assert f"{path} line 7" in str(error)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    """An unknown [section] is an error naming it and the line of its header."""
    path = write(tmp_path, '[api]\nsocket = "/x.sock"\n\n[metric]\nlisten = ""\n')
    error = error_from(config_path=path)
    assert (error.key, error.source) == ("metric", f"{path} line 4")
    assert "unknown section" in str(error)
    assert "metrics" in str(error)


def test_top_level_key_in_file(tmp_path: Path) -> None:
    """A setting written outside its section is an error pointing at the right one."""
    path = write(tmp_path, 'socket = "/x.sock"\n')
    error = error_from(config_path=path)
    assert (error.key, error.source) == ("socket", f"{path} line 1")
    assert "api.socket" in str(error)


def test_unknown_supervisor_variable() -> None:
    """An unknown SUPERVISOR_ variable is an error naming it; CONFIG and TEST_ ones are not."""
    error = error_from(environ={"SUPERVISOR_API_SOKET": "/x.sock"})
    assert (error.key, error.source) == ("SUPERVISOR_API_SOKET", "environment SUPERVISOR_API_SOKET")
    assert "SUPERVISOR_API_SOCKET" in str(error)
    load_settings(environ={"SUPERVISOR_TEST_DOCKER": "1", "OTHER_THING": "x"})


def test_unknown_flag() -> None:
    """A flag for a key that does not exist is an error naming it."""
    error = error_from(flags={"api.sokcet": "/x"})
    assert error.key == "api.sokcet"


# --- Types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "got"),
    [
        ("[docker]\ninspect_concurrency = true", "docker.inspect_concurrency", "got true"),
        ('[docker]\ninspect_concurrency = "8"', "docker.inspect_concurrency", 'got "8"'),
        ("[docker]\ninspect_concurrency = 8.0", "docker.inspect_concurrency", "got 8.0"),
        ("[docker]\nping_interval_seconds = false", "docker.ping_interval_seconds", "got false"),
        ('[docker]\ntls_verify = "yes"', "docker.tls_verify", 'got "yes"'),
        ("[api]\nsocket = 5", "api.socket", "got 5"),
        ('[api]\nallowed_uids = ["1000"]', "api.allowed_uids", 'got ["1000"]'),
        ('[metrics]\ncontainer_labels = "a,b"', "metrics.container_labels", 'got "a,b"'),
        ("[log]\nlevel = 10", "log.level", "got 10"),
        ("[api]\nmax_body_bytes = nan", "api.max_body_bytes", "got nan"),
        ("[api]\nheartbeat_seconds = inf", "api.heartbeat_seconds", "got inf"),
        ("api = 3", "api", "got 3"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str, got: str) -> None:
    """A value of the wrong type (a bool is not a number, a string is not an int) is an error."""
    path = write(tmp_path, text + "\n")
    error = error_from(config_path=path)
    assert error.key == key
    assert error.source.startswith(path + " line ")
    assert got in str(error)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SUPERVISOR_API_MAX_CONNECTIONS", "many"),
        ("SUPERVISOR_API_MAX_CONNECTIONS", "1.5"),
        ("SUPERVISOR_BACKOFF_FACTOR", "double"),
        ("SUPERVISOR_BACKOFF_FACTOR", "nan"),
        ("SUPERVISOR_DOCKER_TLS_VERIFY", "maybe"),
        ("SUPERVISOR_API_ALLOWED_UIDS", "1000,bob"),
        ("SUPERVISOR_API_MODE", "rw-rw----"),
    ],
)
def test_wrong_type_in_environment(name: str, value: str) -> None:
    """An environment value that does not parse as the setting's type names the variable."""
    error = error_from(environ={name: value})
    assert error.source == f"environment {name}"
    assert f'got "{value}"' in str(error)


def test_integers_accepted_for_floats(tmp_path: Path) -> None:
    """An integer is fine where seconds are expected, and is stored as a float."""
    path = write(tmp_path, "[docker]\nping_interval_seconds = 3\n")
    settings = load_settings(config_path=path, environ={"SUPERVISOR_BACKOFF_MAX_SECONDS": "60"})
    assert settings.docker.ping_interval_seconds == 3.0
    assert isinstance(settings.docker.ping_interval_seconds, float)
    assert settings.backoff.max_seconds == 60.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("YES", True), ("1", True), ("false", False), ("no", False), ("0", False)],
)
def test_booleans_from_environment(value: str, expected: bool) -> None:
    """Booleans in the environment are true/false/yes/no/1/0, any case."""
    settings = load_settings(environ={"SUPERVISOR_PROCESS_ALLOW_ROOT_GROUP": value})
    assert settings.process.allow_root_group is expected


# --- Ranges ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[backoff]\ninitial_seconds = -1", "backoff.initial_seconds", "> 0, got -1"),
        ("[docker]\nping_timeout_seconds = 0", "docker.ping_timeout_seconds", "> 0, got 0"),
        ("[backoff]\nfactor = 0.5", "backoff.factor", ">= 1, got 0.5"),
        ("[backoff]\nreset_after_seconds = -0.1", "backoff.reset_after_seconds", ">= 0"),
        ("[watch]\nsocket_poll_seconds = 6", "watch.socket_poll_seconds", "<= 5, got 6"),
        ("[watch]\nhistory_size = 0", "watch.history_size", ">= 1, got 0"),
        ("[docker]\ninspect_concurrency = 257", "docker.inspect_concurrency", "1..256"),
        ('[metrics]\nlisten = "127.0.0.1:70000"', "metrics.listen", '"127.0.0.1:70000"'),
        ('[metrics]\nlisten = "9856"', "metrics.listen", "HOST:PORT"),
        ('[metrics]\nlisten = "::1:9856"', "metrics.listen", "[IPV6]:PORT"),
        ("[metrics]\ncontainer_labels = ['a', 'a']", "metrics.container_labels", "distinct"),
        ("[api]\nmode = 0o1000", "api.mode", "0..0o777, got 512 (0o1000)"),
        ('[api]\nmode = "1000"', "api.mode", 'got "1000"'),
        ('[api]\nmode = "0668"', "api.mode", 'got "0668"'),
        ("[api]\nallowed_gids = [-1]", "api.allowed_gids", "got [-1]"),
        ('[api]\nsocket = ""', "api.socket", "non-empty"),
        (f'[api]\nsocket = "/{"s" * 107}"', "api.socket", "107 bytes"),
        (
            '[log]\nlevel = "verbose"',
            "log.level",
            'one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL, got "verbose"',
        ),
        ('[log]\nformat = "xml"', "log.format", 'one of text, json, got "xml"'),
        ('[docker]\nhost = "docker.sock"', "docker.host", "unix:///PATH"),
        ('[docker]\nhost = "tcp://proxy:0"', "docker.host", "tcp://HOST[:PORT]"),
        ("[docker]\ncandidates = []", "docker.candidates", "non-empty"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, key: str, message: str) -> None:
    """A value of the right type but outside its range names the key, the file and the line."""
    path = write(tmp_path, "# header\n" + text + "\n")
    error = error_from(config_path=path)
    assert error.key == key
    assert error.source == f"{path} line 3"
    assert message in str(error)
    assert str(error).endswith(f"(from {path} line 3)")
    assert "\n" not in str(error)


def test_mode_error_message(tmp_path: Path) -> None:
    """The mode error reads like the documented example."""
    path = write(tmp_path, "[api]\nmode = 0o7777\n")
    assert str(error_from(config_path=path)) == (
        f"api.mode: expected an octal file mode 0..0o777, got 4095 (0o7777) (from {path} line 2)"
    )


def test_out_of_range_from_environment() -> None:
    """Range errors from the environment name the variable."""
    error = error_from(environ={"SUPERVISOR_METRICS_LISTEN": "localhost:70000"})
    assert (error.key, error.source) == ("metrics.listen", "environment SUPERVISOR_METRICS_LISTEN")


def test_invalid_value_is_an_error_even_if_overridden(tmp_path: Path) -> None:
    """A bad file value is reported although the environment sets the same key."""
    path = write(tmp_path, "[api]\nmax_connections = 0\n")
    error = error_from(config_path=path, environ={"SUPERVISOR_API_MAX_CONNECTIONS": "5"})
    assert error.source == f"{path} line 2"


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    """max_seconds below initial_seconds blames whichever was set in the later layer."""
    path = write(tmp_path, "[backoff]\nmax_seconds = 0.25\n")
    error = error_from(config_path=path, environ={"SUPERVISOR_BACKOFF_INITIAL_SECONDS": "5"})
    assert (error.key, error.source) == (
        "backoff.initial_seconds",
        "environment SUPERVISOR_BACKOFF_INITIAL_SECONDS",
    )
    assert f"backoff.max_seconds (0.25 from {path} line 2)" in str(error)
    error = error_from(config_path=path)
    assert error.key == "backoff.max_seconds"
    assert "backoff.initial_seconds (0.5 from default)" in str(error)


# --- Special forms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml_value", "expected"),
    [
        ('"0660"', 0o660),
        ('"0o640"', 0o640),
        ('"600"', 0o600),
        ("0o755", 0o755),
        ("384", 0o600),
        ('"0"', 0),
    ],
)
def test_octal_mode_in_file(tmp_path: Path, toml_value: str, expected: int) -> None:
    """api.mode accepts a TOML integer or an octal string, and stores an int."""
    path = write(tmp_path, f"[api]\nmode = {toml_value}\n")
    assert load_settings(config_path=path, environ={}).api.mode == expected


@pytest.mark.parametrize("mode", [0, 0o600, 0o640, 0o660, 0o777])
def test_octal_mode_from_environment(mode: int) -> None:
    """SUPERVISOR_API_MODE is octal with or without 0 or 0o in front."""
    for spelling in (f"{mode:o}", f"0{mode:o}", f"0o{mode:o}", f"0O{mode:o}"):
        settings = load_settings(environ={"SUPERVISOR_API_MODE": spelling})
        assert settings.api.mode == mode


def test_comma_lists_from_environment() -> None:
    """Lists in the environment are comma-separated, with blanks stripped and empty items dropped."""
    settings = load_settings(
        environ={
            "SUPERVISOR_API_ALLOWED_UIDS": " 1000, 1001 ,",
            "SUPERVISOR_API_ALLOWED_GIDS": "",
            "SUPERVISOR_METRICS_CONTAINER_LABELS": "com.docker.compose.project, homelabarr.app",
            "SUPERVISOR_DOCKER_CANDIDATES": "/a.sock,$XDG_RUNTIME_DIR/b.sock",
        }
    )
    assert settings.api.allowed_uids == (1000, 1001)
    assert settings.api.allowed_gids == ()
    assert settings.metrics.container_labels == ("com.docker.compose.project", "homelabarr.app")
    assert settings.docker.candidates == ("/a.sock", "$XDG_RUNTIME_DIR/b.sock")


def test_group_and_user_accept_numbers(tmp_path: Path) -> None:
    """api.group and process.user take a name or a number; numbers are stored as text."""
    path = write(tmp_path, '[api]\ngroup = 999\n[process]\nuser = "nobody"\n')
    settings = load_settings(config_path=path, environ={})
    assert (settings.api.group, settings.process.user) == ("999", "nobody")


def test_ipv6_metrics_listener() -> None:
    """A bracketed IPv6 listener is accepted and split without brackets."""
    settings = load_settings(environ={}, flags={"metrics.listen": "[::1]:9856"})
    assert settings.metrics == MetricsSettings(listen="[::1]:9856")
    assert settings.metrics.address == ("::1", 9856)


def test_other_toml_spellings_are_located(tmp_path: Path) -> None:
    """Dotted keys and inline tables are accepted, and errors still find their line."""
    path = write(tmp_path, '[api]\nsocket = "/x.sock"\n\n[log]\nlevel = "debug"\nformat = "yaml"\n')
    assert error_from(config_path=path).source == f"{path} line 6"
    path = write(tmp_path, "title = 1\n")
    assert error_from(config_path=path).source == f"{path} line 1"
    path = write(tmp_path, 'log.level = "warning"\nwatch = { history_size = 0 }\n')
    assert error_from(config_path=path).source == f"{path} line 2"
    path = write(tmp_path, 'log.level = "warning"\napi.mode = "0600"\n')
    settings = load_settings(config_path=path, environ={})
    assert (settings.log.level, settings.api.mode) == ("WARNING", 0o600)
    assert settings.sources()["api.mode"] == f"{path} line 2"


# --- The file itself ---------------------------------------------------------------------


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error is a "config" error with the path and tomllib's line and column."""
    path = write(tmp_path, '[api]\nsocket = "/x.sock"\nmode 0660\n')
    error = error_from(config_path=path)
    assert (error.key, error.source) == ("config", path)
    assert "line 3" in str(error)
    assert "column" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a "config" error naming the path, also when named by SUPERVISOR_CONFIG."""
    path = str(tmp_path / "absent.toml")
    error = error_from(config_path=path)
    assert (error.key, error.source) == ("config", path)
    assert "No such file" in str(error)
    error = error_from(environ={"SUPERVISOR_CONFIG": path})
    assert error.source == path


def test_unreadable_file(tmp_path: Path) -> None:
    """A path that is not a readable file (here a directory) is a "config" error."""
    error = error_from(config_path=str(tmp_path))
    assert (error.key, error.source) == ("config", str(tmp_path))


def test_config_error_is_picklable() -> None:
    """ConfigError survives pickling with its fields, e.g. across a process boundary."""
    error = pickle.loads(pickle.dumps(ConfigError("api.mode", "default", "bad")))
    assert (error.key, error.source, error.problem) == ("api.mode", "default", "bad")
    assert str(error) == "api.mode: bad (from default)"

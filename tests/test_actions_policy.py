"""The action policy, the own-container detection and the [actions] settings. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.actions import OwnContainer, Policy, own_container_from
from supervisor.records import ContainerRecord, record_from_inspect
from supervisor.settings import ActionsSettings, ConfigError, load_settings
from tests.fakes import inspect_body

CID = "3f" * 32
OTHER = "a1" * 32


@dataclass(frozen=True)
class FakePeer:
    pid: int = 4242
    uid: int = 1000
    gid: int = 1000


def record(
    cid: str = CID, name: str = "web", labels: dict[str, str] | None = None
) -> ContainerRecord:
    return record_from_inspect(inspect_body(cid, name, status="running", labels=labels))


def policy(own: OwnContainer | None = None, **settings: object) -> Policy:
    return Policy(ActionsSettings(**settings), own or OwnContainer())  # type: ignore[arg-type]


# -- who and what ------------------------------------------------------------------------


def test_nothing_is_allowed_by_default_and_the_message_names_the_setting() -> None:
    """With the defaults every action is refused, naming actions.allow."""
    p = policy()
    for action in ("start", "stop", "restart", "remove", "logs"):
        refusal = p.refuse_caller(action, FakePeer())
        assert refusal is not None
        assert f'add "{action}" to actions.allow' in refusal


def test_only_listed_actions_are_allowed() -> None:
    """allow = [stop, logs]: those pass, the others are refused."""
    p = policy(allow=("stop", "logs"))
    assert p.refuse_caller("stop", FakePeer()) is None
    assert p.refuse_caller("logs", FakePeer()) is None
    refusal = p.refuse_caller("remove", FakePeer())
    assert refusal is not None and "allowed: stop, logs" in refusal


def test_peers_by_uid_or_gid() -> None:
    """With allowed_uids/gids set, a peer passes by either; others and unknown peers are refused."""
    p = policy(allow=("start",), allowed_uids=(0,), allowed_gids=(998,))
    assert p.refuse_caller("start", FakePeer(uid=0, gid=0)) is None
    assert p.refuse_caller("start", FakePeer(uid=1000, gid=998)) is None
    refusal = p.refuse_caller("start", FakePeer(uid=65534, gid=65534))
    assert refusal is not None
    assert "uid 65534" in refusal and "actions.allowed_uids" in refusal
    assert "actions.allowed_gids" in refusal
    assert p.refuse_caller("start", None) is not None


def test_without_peer_lists_any_peer_may_act() -> None:
    """Empty allowed_uids and allowed_gids: the API's own peer check is the only one."""
    assert policy(allow=("start",)).refuse_caller("start", None) is None


# -- which containers ----------------------------------------------------------------------


def test_label_selector_key_and_key_value_all_must_match() -> None:
    """KEY needs the label with any value, KEY=VALUE that value; every selector must hold."""
    p = policy(allow=("stop",), selector_labels=("managed", "tier=web"))
    assert p.refuse_container(record(labels={"managed": "", "tier": "web"})) is None
    refusal = p.refuse_container(record(labels={"managed": "yes", "tier": "db"}))
    assert refusal is not None
    assert "tier=web" in refusal and "actions.selector_labels" in refusal
    refusal = p.refuse_container(record(labels={"tier": "web"}))
    assert refusal is not None and "label managed" in refusal


def test_compose_project_selector() -> None:
    """Only containers of a listed compose project; a container of none is refused too."""
    p = policy(allow=("stop",), selector_compose_projects=("media", "tools"))
    ok = record(labels={"com.docker.compose.project": "media"})
    assert p.refuse_container(ok) is None
    refusal = p.refuse_container(record(labels={"com.docker.compose.project": "db"}))
    assert refusal is not None
    assert "(db)" in refusal and "actions.selector_compose_projects" in refusal
    refusal = p.refuse_container(record())
    assert refusal is not None and "(none)" in refusal


def test_both_selectors_must_hold() -> None:
    """With labels and projects set, a container needs both."""
    p = policy(allow=("stop",), selector_labels=("managed",), selector_compose_projects=("media",))
    both = {"managed": "1", "com.docker.compose.project": "media"}
    assert p.refuse_container(record(labels=both)) is None
    assert p.refuse_container(record(labels={"managed": "1"})) is not None
    assert p.refuse_container(record(labels={"com.docker.compose.project": "media"})) is not None


def test_own_container_is_refused_unless_allow_self() -> None:
    """The supervisor's own container is out of reach; allow_self = true lifts that."""
    own = OwnContainer(container_id=CID, method="mountinfo")
    refusal = policy(own, allow=("stop",)).refuse_container(record())
    assert refusal is not None
    assert "own container" in refusal and "actions.allow_self = true" in refusal
    assert policy(own, allow=("stop",)).refuse_container(record(OTHER)) is None
    assert policy(own, allow=("stop",), allow_self=True).refuse_container(record()) is None


def test_own_container_by_hostname_prefix() -> None:
    """Found only by a 12-hex hostname: every id with that prefix counts as ours."""
    own = OwnContainer(prefix=CID[:12], method="hostname")
    assert own.matches(CID) and not own.matches(OTHER)
    assert policy(own, allow=("stop",)).refuse_container(record()) is not None


# -- finding our own container -------------------------------------------------------------

MOUNTINFO_DOCKER = f"""\
1106 1088 0:64 / / rw,relatime master:471 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X
1111 1106 254:1 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda1 rw
1112 1106 254:1 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda1 rw
"""
MOUNTINFO_PODMAN = f"""\
712 690 0:52 /containers/storage/overlay-containers/{CID}/userdata/hostname /etc/hostname rw - xfs /dev/sda2 rw
"""
MOUNTINFO_HOST = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
"""


@pytest.mark.parametrize(
    ("cgroup", "mountinfo", "hostname", "want"),
    [
        ("0::/\n", MOUNTINFO_DOCKER, "custom", OwnContainer(CID, None, "mountinfo")),
        ("0::/\n", MOUNTINFO_PODMAN, "custom", OwnContainer(CID, None, "mountinfo")),
        (
            f"12:pids:/docker/{CID}\n1:name=systemd:/docker/{CID}\n",
            "",
            "x",
            OwnContainer(CID, None, "cgroup"),
        ),
        (
            f"0::/system.slice/docker-{CID}.scope\n",
            MOUNTINFO_HOST,
            "x",
            OwnContainer(CID, None, "cgroup"),
        ),
        (
            f"0::/machine.slice/libpod-{CID}.scope/container\n",
            "",
            "x",
            OwnContainer(CID, None, "cgroup"),
        ),
        ("0::/\n", MOUNTINFO_HOST, CID[:12], OwnContainer(None, CID[:12], "hostname")),
        ("0::/\n", MOUNTINFO_HOST, "nas", OwnContainer()),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", MOUNTINFO_HOST, "", OwnContainer()),
    ],
    ids=[
        "docker-mounts",
        "podman-mounts",
        "cgroup-v1",
        "cgroup-v2-host-ns",
        "podman-cgroup",
        "hostname",
        "host",
        "host-session",
    ],
)
def test_own_container_detection(
    cgroup: str, mountinfo: str, hostname: str, want: OwnContainer
) -> None:
    """mountinfo first, then the cgroup path, then a 12-hex hostname; nothing on a plain host."""
    assert own_container_from(cgroup, mountinfo, hostname) == want


# -- settings ----------------------------------------------------------------------------


def test_actions_settings_from_file_and_environment(tmp_path: Path) -> None:
    """[actions] keys load from TOML and SUPERVISOR_ACTIONS_* (lists comma-separated)."""
    config = tmp_path / "s.toml"
    config.write_text(
        '[actions]\nallow = ["start", "stop"]\nselector_labels = ["managed", "tier=web"]\n'
        "allow_self = true\ntimeout_seconds = 5\n"
    )
    settings = load_settings(
        config_path=str(config),
        environ={"SUPERVISOR_ACTIONS_ALLOWED_UIDS": "0, 1000", "SUPERVISOR_ACTIONS_ALLOW": "logs"},
    )
    a = settings.actions
    assert a.allow == ("logs",)
    assert a.selector_labels == ("managed", "tier=web")
    assert a.allowed_uids == (0, 1000)
    assert a.allow_self is True and a.timeout_seconds == 5.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('allow = ["stop", "kill"]', "actions.allow"),
        ('allow = ["stop", "stop"]', "actions.allow"),
        ('selector_labels = ["=x"]', "actions.selector_labels"),
        ('selector_compose_projects = [""]', "actions.selector_compose_projects"),
        ("allowed_uids = [-1]", "actions.allowed_uids"),
        ("timeout_seconds = 0", "actions.timeout_seconds"),
    ],
)
def test_bad_actions_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """An invalid [actions] value is an error naming its key and file line."""
    config = tmp_path / "s.toml"
    config.write_text(f"[actions]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=str(config), environ={})
    assert caught.value.key == key
    assert "line 2" in caught.value.source

"""Tests for agent.config: defaults, every kind of problem message, paths, describe() and diff()."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import tomllib
from pathlib import Path

import pytest

from agent import config
from agent import cores as cpu_cores
from agent.errors import ConfigError, ConfigProblem

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def problems_of(text: str) -> list[ConfigProblem]:
    """The problems loads() reports for ``text`` (which must be invalid)."""
    with pytest.raises(ConfigError) as caught:
        config.loads(textwrap.dedent(text))
    return caught.value.problems


def only_problem(text: str) -> str:
    """The single problem reported for ``text``, rendered as the operator sees it."""
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return str(problems[0])


class TestDefaults:
    def test_defaults_match_the_schema(self) -> None:
        """default() carries the documented default of a sample of every kind of setting."""
        cfg = config.default()
        assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
        assert cfg.server.cert_file is None
        assert cfg.models.providers == ("CPUExecutionProvider",)
        assert cfg.models.on_remove == "unload"
        assert cfg.drift.psi_warn == 0.1
        assert cfg.drift.psi_alert == 0.25
        assert cfg.auth.predict_tokens == ()
        assert cfg.upstream.url == ""
        assert cfg.log.format == "auto"
        assert cfg.source is None

    def test_default_paths_resolve_against_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With no config file, ./models and ./state are under the working directory."""
        monkeypatch.chdir(tmp_path)
        cfg = config.default()
        assert cfg.models.dir == tmp_path / "models"
        assert cfg.state.dir == tmp_path / "state"

    def test_empty_text_equals_default(self) -> None:
        """An empty file means every default."""
        assert config.loads("") == config.default()

    def test_config_is_frozen(self) -> None:
        """Settings cannot be changed after loading."""
        cfg = config.default()
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.server.port = 1  # type: ignore[misc]

    def test_agent_name_falls_back_to_host_name(self) -> None:
        """An empty agent_id means the machine's host name; a set one is used as is."""
        assert config.default().upstream.agent_name()
        assert config.Upstream(agent_id="edge-7").agent_name() == "edge-7"


class TestExampleFile:
    def test_example_loads_without_problems(self) -> None:
        """config.example.toml is a valid config."""
        assert config.load(EXAMPLE).source == EXAMPLE

    def test_example_equals_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The example's values are the defaults (paths compared from the example's directory)."""
        monkeypatch.chdir(EXAMPLE.parent)
        loaded = dataclasses.replace(config.load(EXAMPLE), source=None)
        assert loaded == config.default()

    def test_example_names_every_section_and_key(self) -> None:
        """Every setting of the schema is written out in the example."""
        written = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
        schema = {
            name: {f.name for f in dataclasses.fields(getattr(config.default(), name))}
            for name in written
        }
        assert set(written) == {f.name for f in dataclasses.fields(config.Config)} - {"source"}
        assert {name: set(keys) for name, keys in written.items()} == schema


class TestTypes:
    def test_wrong_type_names_value_and_expectation(self) -> None:
        """A string where an integer belongs is reported with key, line, value and range."""
        message = only_problem(
            """\
            [server]
            host = "0.0.0.0"
            port = "80a"
            """
        )
        assert message == 'server.port (line 3): got "80a"; expected an integer 0..65535'

    def test_quoted_number_suggests_removing_quotes(self) -> None:
        """A number written in quotes gets a hint to remove them."""
        message = only_problem('[models]\nsettle_ms = "500"\n')
        assert message == (
            'models.settle_ms (line 2): got "500"; expected an integer >= 0 (milliseconds); '
            "remove the quotes"
        )

    def test_bool_is_not_an_integer(self) -> None:
        """true is rejected where an integer is expected, although bool subclasses int."""
        message = only_problem("[batching]\nworkers = true\n")
        assert message == (
            "batching.workers (line 2): got true; expected an integer >= 1; "
            "true/false is not a number"
        )

    def test_bool_is_not_a_float(self) -> None:
        """false is rejected where a number is expected."""
        message = only_problem("[capture]\nrate = false\n")
        assert "got false; expected a number 0..1" in message

    def test_float_is_not_an_integer(self) -> None:
        """2.0 is rejected where a whole number is expected."""
        message = only_problem("[models]\nwarmup_runs = 2.0\n")
        assert message.endswith("use a whole number, without a decimal point")

    def test_integer_is_accepted_as_float(self) -> None:
        """An integer is fine where a number is expected, and becomes a float."""
        cfg = config.loads("[server]\ndrain_timeout_s = 5\n")
        assert cfg.server.drain_timeout_s == 5.0
        assert isinstance(cfg.server.drain_timeout_s, float)

    def test_string_is_not_a_bool(self) -> None:
        """A quoted "true" is rejected with a hint to drop the quotes."""
        message = only_problem('[log]\naccess_log = "true"\n')
        assert message == (
            'log.access_log (line 2): got "true"; expected true or false; '
            "write true or false, without quotes"
        )

    def test_integer_is_not_a_bool(self) -> None:
        """1 is rejected where true or false is expected."""
        assert "got 1; expected true or false" in only_problem("[outbox]\nfsync = 1\n")

    def test_option_suggests_the_closest_choice(self) -> None:
        """A misspelt option lists the choices and suggests the closest one."""
        message = only_problem('[log]\nlevel = "WARN"\n')
        assert message == (
            'log.level (line 2): got "WARN"; expected one of "debug", "info", "warning", '
            '"error"; did you mean "warning"?'
        )

    def test_list_setting_rejects_a_bare_string(self) -> None:
        """A single string where a list belongs gets a hint to wrap it in brackets."""
        message = only_problem('[models]\nproviders = "CPUExecutionProvider"\n')
        assert message.endswith('wrap it in brackets: ["CPUExecutionProvider"]')

    def test_infinite_number_is_rejected(self) -> None:
        """inf is not a usable timeout."""
        assert "got inf" in only_problem("[server]\ndrain_timeout_s = inf\n")

    def test_sequences_become_tuples(self) -> None:
        """Lists in the file become tuples in the frozen config."""
        cfg = config.loads('[models]\nproviders = ["A", "B"]\n')
        assert cfg.models.providers == ("A", "B")


class TestRanges:
    def test_out_of_range_integer(self) -> None:
        """A port above 65535 is reported with the allowed range."""
        message = only_problem("[server]\nport = 70000\n")
        assert message == "server.port (line 2): got 70000; expected an integer 0..65535"

    def test_processes_zero_means_one_per_usable_core(self) -> None:
        """processes = 0 resolves to the cores this process may run on (its affinity mask,
        capped by its cgroup CPU quota); N stays N."""
        auto = config.loads("[server]\nprocesses = 0\n").server
        affinity = len(os.sched_getaffinity(0))
        assert auto.serving_processes() == cpu_cores.usable_cores(
            affinity, cpu_cores.cgroup_cpu_quota()
        )
        assert 1 <= auto.serving_processes() <= min(64, affinity)
        assert config.loads("[server]\nprocesses = 3\n").server.serving_processes() == 3
        assert config.default().server.serving_processes() == 1
        message = only_problem("[server]\nprocesses = 65\n")
        assert message == "server.processes (line 2): got 65; expected an integer 0..64"

    def test_port_zero_is_allowed(self) -> None:
        """Port 0 (ephemeral) is valid."""
        assert config.loads("[server]\nport = 0\n").server.port == 0

    def test_exclusive_lower_bound_names_the_unit(self) -> None:
        """A zero timeout is rejected with '> 0' and its unit."""
        message = only_problem("[upstream]\ntimeout_s = 0\n")
        assert message == "upstream.timeout_s (line 2): got 0; expected a number > 0 (seconds)"

    def test_empty_list_is_rejected_where_required(self) -> None:
        """providers may not be empty."""
        message = only_problem("[models]\nproviders = []\n")
        assert "got []; expected a non-empty array of strings" in message

    def test_psi_warn_must_be_below_alert(self) -> None:
        """psi_warn >= psi_alert is reported on psi_warn with both values."""
        message = only_problem("[drift]\npsi_warn = 0.3\npsi_alert = 0.2\n")
        assert message.startswith(
            "drift.psi_warn (line 2): got 0.3 with psi_alert = 0.2; expected psi_warn < psi_alert"
        )

    def test_upstream_url_needs_a_scheme(self) -> None:
        """A URL without http(s):// is rejected with a suggested fix."""
        message = only_problem('[upstream]\nurl = "collector:9000"\n')
        assert message.endswith('did you mean "https://collector:9000"?')


def cgroup_files(root: Path, files: dict[str, str], membership: str = "0::/\n") -> Path:
    """Files under ``root`` laid out like /sys/fs/cgroup; returns the /proc/self/cgroup
    stand-in (``membership``) written next to them."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    self_cgroup = root.parent / "self-cgroup"
    self_cgroup.write_text(membership)
    return self_cgroup


class TestCpuQuota:
    """``processes = 0`` on a CPU-limited cgroup: real cgroup files written under tmp_path."""

    @pytest.mark.parametrize(
        ("files", "quota"),
        [
            ({"cpu.max": "150000 100000\n"}, 1.5),
            ({"cpu.max": "max 100000\n"}, None),
            ({"cpu.max": "50000 100000\n"}, 0.5),
            ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),
            ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
            (
                {
                    "cpu,cpuacct/cpu.cfs_quota_us": "100000",
                    "cpu,cpuacct/cpu.cfs_period_us": "50000",
                },
                2.0,
            ),
            ({"cpu/cpu.cfs_quota_us": "250000\n"}, None),  # no period: not a quota
            ({"cpu.max": "garbage\n"}, None),
            ({"cpu.max": ""}, None),
            ({}, None),
        ],
        ids=[
            "v2-1.5",
            "v2-max",
            "v2-half",
            "v1-2.5",
            "v1-unlimited",
            "v1-cpu,cpuacct",
            "v1-no-period",
            "v2-garbage",
            "v2-empty",
            "none",
        ],
    )
    def test_quota_from_the_mount_root(
        self, tmp_path: Path, files: dict[str, str], quota: float | None
    ) -> None:
        """cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` at the root."""
        root = tmp_path / "cgroup"
        membership = cgroup_files(root, files)
        assert cpu_cores.cgroup_cpu_quota(root, membership) == quota

    def test_the_tightest_quota_on_the_path_to_this_process_wins(self, tmp_path: Path) -> None:
        """A systemd unit's CPUQuota is on its own cgroup, below a looser slice's."""
        root = tmp_path / "cgroup"
        files = {
            "system.slice/cpu.max": "300000 100000\n",
            "system.slice/edge.service/cpu.max": "120000 100000\n",
            "other.slice/cpu.max": "10000 100000\n",  # not ours
        }
        membership = cgroup_files(root, files, "0::/system.slice/edge.service\n")
        assert cpu_cores.cgroup_cpu_quota(root, membership) == 1.2
        v1 = {
            "cpu,cpuacct/docker/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        }
        lines = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n"
        membership = cgroup_files(tmp_path / "v1", v1, lines)
        assert cpu_cores.cgroup_cpu_quota(tmp_path / "v1", membership) == 1.5

    def test_unreadable_or_missing_files_mean_no_quota(self, tmp_path: Path) -> None:
        """A cpu.max that cannot be read (here a directory) and a missing membership file."""
        root = tmp_path / "cgroup"
        (root / "cpu.max").mkdir(parents=True)
        assert cpu_cores.cgroup_cpu_quota(root, tmp_path / "no-such-file") is None
        assert cpu_cores.cgroup_cpu_quota(tmp_path / "nothing", tmp_path / "no-such-file") is None

    @pytest.mark.parametrize(
        ("affinity", "quota", "cores"),
        [(16, 1.5, 2), (16, None, 16), (2, 8.0, 2), (16, 0.5, 1), (128, None, 64), (4, 4.0, 4)],
    )
    def test_usable_cores(self, affinity: int, quota: float | None, cores: int) -> None:
        """min(affinity, ceil(quota)), at least 1, at most 64."""
        assert cpu_cores.usable_cores(affinity, quota) == cores


class TestUnknownNames:
    def test_unknown_key_suggests_the_closest(self) -> None:
        """A misspelt key is reported on its own line with the closest real key."""
        message = only_problem(
            """\
            # comment
            [server]
            port = 1

            [models]
            dir = "m"
            setle_ms = 3
            """
        )
        assert message == 'models.setle_ms (line 7): unknown key; did you mean "settle_ms"?'

    def test_unknown_key_without_close_match_lists_the_keys(self) -> None:
        """A key like no other lists the valid keys of its section."""
        message = only_problem("[capture]\nzzz = 1\n")
        assert message == 'capture.zzz (line 2): unknown key; expected one of: "rate"'

    def test_unknown_section_points_at_its_header(self) -> None:
        """An unknown section is reported at its header line with a suggestion."""
        message = only_problem('[log]\nlevel = "info"\n\n[modles]\ndir = "x"\n')
        assert message == "modles (line 4): unknown section; did you mean [models]?"

    def test_key_outside_any_section_names_its_section(self) -> None:
        """A setting written above every header says which section it belongs to."""
        message = only_problem("port = 8080\n")
        assert message == (
            "port (line 1): unknown key at the top level; did you mean to put it under [server]?"
        )

    def test_section_written_as_a_value(self) -> None:
        """A section given as a plain value asks for a table."""
        assert "server (line 1): got 3; expected a table" in only_problem("server = 3\n")

    def test_subtable_is_an_unknown_key(self) -> None:
        """A [server.tls] table is an unknown key of [server], found at its header."""
        assert only_problem("[server.tls]\ncert = 'x'\n").startswith(
            "server.tls (line 1): unknown key"
        )

    def test_keys_inside_multiline_strings_are_not_lines(self) -> None:
        """Text that looks like a key inside a multi-line string does not move line numbers."""
        problems = problems_of('[server]\nzz = """\nport = 1\n"""\nport = -1\n')
        assert [(p.key, p.line) for p in problems] == [("server.zz", 2), ("server.port", 5)]


class TestCrossChecks:
    def test_cert_without_key(self) -> None:
        """cert_file alone is reported: TLS needs both files."""
        message = only_problem('[server]\ncert_file = "cert.pem"\n')
        assert message.startswith(
            "server.cert_file (line 2): got cert_file without key_file; expected both or neither"
        )

    def test_key_without_cert(self) -> None:
        """key_file alone is reported on key_file."""
        assert only_problem('[server]\nkey_file = "k.pem"\n').startswith("server.key_file")

    def test_cert_and_key_together_are_valid(self, tmp_path: Path) -> None:
        """Both TLS files together are accepted."""
        cfg = config.loads(f'[server]\ncert_file = "{tmp_path}/c"\nkey_file = "{tmp_path}/k"\n')
        assert (cfg.server.cert_file, cfg.server.key_file) == (tmp_path / "c", tmp_path / "k")

    def test_token_and_token_file_are_exclusive(self) -> None:
        """Giving both token and token_file is one problem on token_file."""
        message = only_problem('[upstream]\ntoken = "s3cret"\ntoken_file = "/etc/tok"\n')
        assert message.startswith(
            "upstream.token_file (line 3): got both token and token_file; expected at most one"
        )

    def test_cross_check_skipped_when_a_key_is_already_wrong(self) -> None:
        """A wrong psi_alert is reported once, without a second psi-order problem."""
        problems = problems_of('[drift]\npsi_warn = 0.3\npsi_alert = "x"\n')
        assert [p.key for p in problems] == ["drift.psi_alert"]


class TestSyntaxAndFiles:
    def test_syntax_error_carries_its_line(self) -> None:
        """A TOML syntax error is one problem at the line tomllib names."""
        problems = problems_of('[server]\nhost = "a"\nport = 80 80\n')
        assert len(problems) == 1
        assert (problems[0].key, problems[0].line) == ("toml", 3)
        assert problems[0].message.startswith("invalid TOML: ")

    def test_syntax_error_at_end_of_file(self) -> None:
        """An error tomllib places at the end of the document gets the last line."""
        problems = problems_of('[server]\nhost = "a\n')
        assert problems[0].line == 2

    def test_syntax_error_hides_the_line_text(self) -> None:
        """A broken line holding a secret is not echoed in the message."""
        with pytest.raises(ConfigError) as caught:
            config.loads('[upstream]\ntoken = "hunter2\n')
        assert "hunter2" not in str(caught.value)

    def test_missing_file_is_one_problem(self, tmp_path: Path) -> None:
        """A file that does not exist is reported as unreadable, naming the path."""
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError) as caught:
            config.load(path)
        assert str(path) in str(caught.value)
        [problem] = caught.value.problems
        assert problem.message.startswith("cannot read it: No such file or directory")

    def test_directory_is_not_a_file(self, tmp_path: Path) -> None:
        """A directory given as the config is reported as unreadable."""
        with pytest.raises(ConfigError) as caught:
            config.load(tmp_path)
        assert caught.value.problems[0].message.startswith("cannot read it")

    def test_non_utf8_file(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is one problem asking for UTF-8."""
        path = tmp_path / "latin1.toml"
        path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
        with pytest.raises(ConfigError) as caught:
            config.load(path)
        assert caught.value.problems[0].message.endswith("save it as UTF-8")

    def test_utf8_bom_is_accepted(self, tmp_path: Path) -> None:
        """A UTF-8 byte order mark (some editors add one) does not break parsing."""
        path = tmp_path / "bom.toml"
        path.write_bytes(b"\xef\xbb\xbf[server]\nport = 9\n")
        assert config.load(path).server.port == 9


class TestManyProblems:
    def test_all_problems_reported_in_line_order(self) -> None:
        """Problems in several sections come back together, each with its own line."""
        text = """\
            [server]
            port = "80a"
            cert_file = "c.pem"

            [models]
            setle_ms = 3
            keep_versions = 0

            [nope]

            [log]
            level = "loud"
            """
        problems = problems_of(text)
        assert [(p.key, p.line) for p in problems] == [
            ("server.port", 2),
            ("server.cert_file", 3),
            ("models.setle_ms", 6),
            ("models.keep_versions", 7),
            ("nope", 9),
            ("log.level", 12),
        ]

    def test_error_message_lists_every_problem(self) -> None:
        """The exception's text names the source, the count and each problem."""
        with pytest.raises(ConfigError) as caught:
            config.loads("[server]\nport = -1\n[log]\nlevel = 1\n", source="agent.toml")
        text = str(caught.value)
        assert text.startswith("agent.toml: 2 problem(s)\n")
        assert "server.port (line 2)" in text
        assert "log.level (line 4)" in text


class TestPaths:
    def test_load_resolves_relative_paths_against_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """In a file, ./models means next to the file, wherever the agent starts."""
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "agent.toml").write_text('[models]\ndir = "./models"\n', encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        cfg = config.load(Path("etc/agent.toml"))
        assert cfg.models.dir == etc / "models"
        assert cfg.state.dir == etc / "state"
        assert cfg.source == etc / "agent.toml"

    def test_loads_resolves_relative_paths_against_cwd(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Text has no directory, so relative paths are under the working directory."""
        monkeypatch.chdir(tmp_path)
        assert config.loads('[state]\ndir = "var/s"\n').state.dir == tmp_path / "var" / "s"

    def test_absolute_paths_are_kept(self, tmp_path: Path) -> None:
        """An absolute path is used as written."""
        cfg = config.loads(f'[upstream]\ntoken_file = "{tmp_path}/tok"\n')
        assert cfg.upstream.token_file == tmp_path / "tok"

    def test_empty_optional_path_means_unset(self) -> None:
        """An optional path written as "" is None."""
        assert config.loads('[auth]\nadmin_token_file = ""\n').auth.admin_token_file is None

    def test_required_path_cannot_be_empty(self) -> None:
        """The drop dir cannot be an empty string."""
        assert 'got ""; expected a path string' in only_problem('[models]\ndir = ""\n')

    def test_path_must_be_a_string(self) -> None:
        """A token file given as a number is rejected."""
        message = only_problem("[auth]\npredict_token_file = 5\n")
        assert message.startswith("auth.predict_token_file (line 2): got 5; expected a path")


class TestSecrets:
    def test_describe_hides_tokens(self) -> None:
        """describe() shows tokens as *** and keeps their count."""
        cfg = config.loads(
            '[upstream]\ntoken = "up-secret"\n[auth]\npredict_tokens = ["p1", "p2"]\n'
        )
        described = config.describe(cfg)
        assert described["upstream"]["token"] == "***"
        assert described["auth"]["predict_tokens"] == ["***", "***"]
        assert "up-secret" not in json.dumps(described)
        assert "p1" not in json.dumps(described)

    def test_describe_is_json_with_every_setting(self) -> None:
        """describe() is JSON-able and has every section and key."""
        described = json.loads(json.dumps(config.describe(config.default())))
        assert described["server"]["port"] == 8080
        assert described["models"]["providers"] == ["CPUExecutionProvider"]
        assert described["source"] is None
        assert len(described["models"]) == len(dataclasses.fields(config.Models))

    def test_describe_leaves_unset_token_empty(self) -> None:
        """An unset token shows as "" so operators can tell it is off."""
        assert config.describe(config.default())["upstream"]["token"] == ""

    def test_describe_masks_url_password(self) -> None:
        """A password inside the upstream URL is masked."""
        cfg = config.loads('[upstream]\nurl = "https://agent:pw123@collector.example/in"\n')
        assert config.describe(cfg)["upstream"]["url"] == "https://agent:***@collector.example/in"

    def test_problem_messages_hide_token_values(self) -> None:
        """A badly typed token list is described by its kind, not its value."""
        message = only_problem('[auth]\nadmin_tokens = "topsecret"\n')
        assert "topsecret" not in message
        assert message == (
            "auth.admin_tokens (line 2): got a string; expected an array of strings; "
            'wrap it in brackets: ["..."]'
        )

    def test_tokens_cannot_hold_whitespace(self) -> None:
        """A token with a space is rejected without echoing it."""
        message = only_problem('[auth]\npredict_tokens = ["ab cd"]\n')
        assert "ab cd" not in message
        assert "expected tokens without whitespace" in message


class TestDiff:
    def test_same_config_has_no_differences(self) -> None:
        """Two loads of the same text differ in nothing."""
        assert config.diff(config.default(), config.default()) == []

    def test_changed_keys_are_listed_as_dotted_names(self) -> None:
        """Each changed setting is named section.key, in schema order."""
        old = config.default()
        new = config.loads('[log]\nlevel = "debug"\n[server]\nport = 9000\n')
        assert config.diff(old, new) == ["server.port", "log.level"]

    def test_secret_change_is_named_not_shown(self) -> None:
        """A changed token is reported by key only."""
        new = config.loads('[auth]\nadmin_tokens = ["a1"]\n')
        assert config.diff(config.default(), new) == ["auth.admin_tokens"]

"""The command line as an operator first meets it: --version and what serve --help tells."""

from __future__ import annotations

import click
from click.testing import CliRunner

from proxy import __version__
from proxy.cli import main, serve


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"spend-guard {__version__}\n"


def test_serve_help_lists_every_environment_variable_it_reads():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    environment = result.output.split("Environment (an option given on the command line wins):")[1]
    names = [line.split()[0] for line in environment.strip().splitlines()]
    options = [p for p in serve.params if isinstance(p, click.Option) and p.envvar]
    assert names == ["IMAGEROUTER_API_KEY", *(p.envvar for p in options)]
    assert {"SPEND_GUARD_REDIS_URL", "SPEND_GUARD_POLICY", "SPEND_GUARD_PORT", "SPEND_GUARD_LOG_FORMAT"} <= set(names)
    # each with the option it stands for
    assert "SPEND_GUARD_REDIS_URL" in environment
    assert "--redis-url" in environment.split("SPEND_GUARD_REDIS_URL")[1].split("\n")[0]


def test_serve_takes_a_log_format_of_text_or_json_only(monkeypatch):
    called = []
    monkeypatch.setattr("proxy.cli.run", lambda settings, policy, **kw: called.append(settings))
    assert CliRunner().invoke(main, ["serve", "--log-format", "json"]).exit_code == 0
    assert called[-1].log_format == "json"
    monkeypatch.setenv("SPEND_GUARD_LOG_FORMAT", "text")
    assert CliRunner().invoke(main, ["serve"]).exit_code == 0 and called[-1].log_format == "text"
    result = CliRunner().invoke(main, ["serve", "--log-format", "xml"])
    assert result.exit_code == 2 and "'xml' is not one of 'text', 'json'" in result.output

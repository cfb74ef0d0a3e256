"""``access.streams_url`` and ``{% streams_url tasks %}``: one URL and one token for many tasks
(``GET /streams``), in the unit tier (settings given, no Redis, no database); and the example
page of many tasks' answers to requests it refuses (system tier). tests/test_multiplex_browser.py
follows its tasks in a browser."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import django
import pytest
from django.conf import settings as django_settings

from streamcoord import tokens
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

if not django_settings.configured:
    django_settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
    django.setup()

from django.template import Context, Engine  # Django is set up above

from django_app import access, conf

from .processes import Project

SECRET = "streams-url-test-secret-0123456789abcdef"
TOKEN_SETTINGS = {"stream_auth": "token", "secret": SECRET}
REFS = [TaskRef("examples", "ProgressTask", "7"), TaskRef("shop", "ExportTask", "a-1")]


@dataclass
class Row:
    """Stands in for a StreamTask row: the tag reads only ``stream_ref``."""

    stream_ref: TaskRef


def use(monkeypatch: pytest.MonkeyPatch, **fields: str) -> None:
    settings = Settings(**fields)
    monkeypatch.setattr(conf, "get_settings", lambda: settings)


def test_one_token_covers_every_task_named_in_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, secret=SECRET, gateway_url="https://streams.example.com/")
    url = access.streams_url([*REFS, REFS[0]], start=True, expires_in=60)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "streams.example.com", "/streams")
    query = parse_qsl(parts.query)
    assert [value for key, value in query if key == "task"] == [ref.label for ref in REFS]
    [token] = [value for key, value in query if key == "token"]
    grant = tokens.verify(SECRET, token)
    assert grant.streams == frozenset(REFS) and grant.start


def test_a_path_without_a_gateway_url_and_no_token_in_public_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, stream_auth="public")
    assert access.streams_url(REFS) == "/streams?task=examples.ProgressTask%3A7&task=shop.ExportTask%3Aa-1"
    with pytest.raises(ValueError):
        access.streams_url([])


def test_the_template_tag_takes_rows_and_escapes_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, secret=SECRET)
    engine = Engine(libraries={"streamcoord": "django_app.templatetags.streamcoord"})
    rows = [Row(ref) for ref in REFS]
    template = engine.from_string(
        '{% load streamcoord %}<a href="{% streams_url tasks %}"></a>'
        "{% streams_url tasks expires_in=30 as url %}[{{ url|safe }}]"
    )
    html = template.render(Context({"tasks": rows}))
    escaped, _, kept = html.partition("</a>")
    assert "&amp;task=shop.ExportTask%3Aa-1&amp;token=" in escaped
    url = kept.strip("[]")
    assert url.startswith("/streams?task=examples.ProgressTask%3A7&task=shop.ExportTask%3Aa-1&token=")
    grant = tokens.verify(SECRET, dict(parse_qsl(urlsplit(url).query))["token"])
    assert grant.streams == frozenset(REFS) and not grant.start


# -- the example page of many tasks (system tier: the example project's database) ---------------

PAGE_CHECKS = """
import json
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
client = Client()
answers = {
    "form": client.get("/tasks/many/").status_code,
    "unknown": client.get("/tasks/many/?pk=999&pk=x").content.decode().count('name="count"'),
    "too_many": client.post("/tasks/many/", {"count": 101, "steps": 1, "delay": 0}).status_code,
    "more_bad": client.post("/tasks/many/more/", {"steps": 0, "delay": 0}).json(),
    "more_get": client.get("/tasks/many/more/").status_code,
}
print(json.dumps(answers))
"""


@pytest.mark.system
def test_the_many_tasks_page_refuses_what_it_cannot_start(project: Project) -> None:
    out = project.manage("shell", "-c", PAGE_CHECKS, **TOKEN_SETTINGS)
    answers = json.loads(out.strip().splitlines()[-1])
    assert answers["form"] == 200
    assert answers["unknown"] == 1  # no task of these: the form again
    assert answers["too_many"] == 400  # one connection follows at most 100 tasks
    assert list(answers["more_bad"]["errors"]) == ["steps"]
    assert answers["more_get"] == 405

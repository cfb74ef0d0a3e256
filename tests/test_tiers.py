"""The tiers guard of tests/conftest.py: a test that uses a fixture starting real parts must be
marked ``system`` (or ``cluster``/``browser``), or its module fails collection, whatever ``-m``
selects. Run on small suites of pytester's own, whose "real" fixtures only fail when set up."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

REAL_FIXTURES = ["redis_server", "redis", "settings", "event_log", "gateway_factory", "gateway", "project"]

INI = """\
[pytest]
asyncio_default_fixture_loop_scope = function
addopts = --strict-markers
markers =
    system: real processes
    browser: headless Chromium
    cluster: Redis Cluster / Sentinel
    slow: more than ~10 s
"""

# The guard itself (imported, not copied), and stand-ins with the real fixtures' names and marks
# that fail the test if they are ever set up: the guard must stop the test before that.
CONFTEST = f"""\
import pytest

from tests.conftest import pytest_make_collect_report, starts  # noqa: F401

for _name in {REAL_FIXTURES!r}:
    def _never(request):
        pytest.fail(f"the fixture {{request.fixturename}} was set up")
    globals()[_name] = pytest.fixture(name=_name)(starts("real " + _name)(_never))
"""

UNIT_TIER = ["-m", "not system and not browser and not cluster and not slow"]


def test_the_real_fixtures_of_the_suite_are_marked(request: pytest.FixtureRequest) -> None:
    """The stand-ins below stand for these: each of the suite's own is marked with ``starts``."""
    for name in REAL_FIXTURES:
        [fixturedef] = request._fixturemanager.getfixturedefs(name, request.node) or [None]
        assert fixturedef is not None and getattr(fixturedef.func, "starts_real_parts", None), name


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_an_unmarked_test_using_a_real_fixture_fails_collection(suite: pytest.Pytester) -> None:
    tests = "".join(f"def test_{name}({name}):\n    pass\n\n" for name in REAL_FIXTURES)
    suite.makepyfile(test_mislabelled="def test_pure():\n    pass\n\n" + tests)
    result = suite.runpytest(*UNIT_TIER)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_mislabelled.py*",
        *(f"*test_mislabelled.py::test_{name} uses {name} (real {name}) but is not marked system*" for name in REAL_FIXTURES),
        "*pytestmark = pytest.mark.system*",
    ])
    assert "test_pure uses" not in result.stdout.str()
    assert "was set up" not in result.stdout.str()


def test_a_fixture_built_on_a_real_one_is_caught_too(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_indirect="""
        import pytest

        @pytest.fixture
        def r(redis):
            return redis

        @pytest.fixture
        def gateway(gateway):  # an override built on the fixture it overrides
            return gateway

        class TestGroup:
            def test_uses_r(self, r):
                pass

            def test_uses_the_override(self, gateway):
                pass
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*test_indirect.py::TestGroup::test_uses_r uses redis (real redis) but is not marked system*",
        "*test_indirect.py::TestGroup::test_uses_the_override uses gateway (real gateway) but*",
    ])


def test_a_modules_own_fixture_of_the_same_name_is_not_a_real_one(suite: pytest.Pytester) -> None:
    """As ``test_feed_logic`` and ``test_registry`` name their fakeredis client ``redis``."""
    suite.makepyfile(test_fake="""
        import pytest

        @pytest.fixture
        def redis():
            return "fakeredis"

        def test_pure(redis):
            assert redis == "fakeredis"
    """)
    suite.runpytest(*UNIT_TIER).assert_outcomes(passed=1)


def test_marked_tests_and_pure_tests_are_collected(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_unit="""
            def test_pure():
                pass
        """,
        test_system="""
            import pytest

            pytestmark = pytest.mark.system

            def test_real(redis_server):
                pass
        """,
        test_cluster="""
            import pytest

            pytestmark = [pytest.mark.cluster, pytest.mark.slow]

            def test_real(gateway):
                pass
        """,
        test_per_test="""
            import pytest

            def test_pure():
                pass

            @pytest.mark.browser
            def test_real(project):
                pass
        """,
    )
    result = suite.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*5 tests collected*"])
    suite.runpytest(*UNIT_TIER).assert_outcomes(passed=2, deselected=3)

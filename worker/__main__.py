"""``python -m worker [--concurrency N]``: a worker of the Django project in
``DJANGO_SETTINGS_MODULE`` (default: the example project)."""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=None, help="tasks run at once")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.project.settings")
    import django

    django.setup()
    from django_app import conf
    from django_app.worker.main import run_worker
    from streamcoord import runtime

    settings = conf.get_settings()
    if not settings.redis_url:
        raise SystemExit("runworker: set STREAMCOORD_REDIS_URL (or start runserver_stream's embedded default)")
    runtime.run(run_worker(settings, args.concurrency))


if __name__ == "__main__":
    main()

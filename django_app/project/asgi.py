"""The example project as an ASGI application: ``uvicorn django_app.project.asgi:application``.

It serves its own static files (the admin's, ``streamcoord/streamcoord.js``) through
Django's ``ASGIStaticFilesHandler``, so that this one process is the whole site behind
nginx's ``location /`` (deploy/nginx/streamcoord.conf) or on an origin of its own. That handler
reads the files through the staticfiles finders on every request: fine for an example, slow
for a busy site. A production project runs ``collectstatic`` and lets nginx (``location
/static/ { alias ...; }``) or WhiteNoise serve them instead.
"""

from __future__ import annotations

import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.project.settings")

application = ASGIStaticFilesHandler(get_asgi_application())

"""The Django side of streamcoord: ``StreamTask``, the ``coordinator``, and the commands.

Django imports the core (``streamcoord``); the core never imports Django.
"""

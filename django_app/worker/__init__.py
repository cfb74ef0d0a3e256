"""The worker: takes StreamTasks from the Redis job queue and runs them.

Started by ``manage.py runworker`` (or, in this repository, ``python -m worker``). Part of the
Django side, not the core: it loads rows and awaits ``StreamTask.process()``. Nothing is imported
here, so importing the package does not load models before Django is set up.
"""

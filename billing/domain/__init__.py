"""Pure business rules: no I/O, no SQLAlchemy, no requests, no Celery."""

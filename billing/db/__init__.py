"""Persistence: SQLAlchemy 2 models, engine/session helpers, migrations and the queries that claim work."""

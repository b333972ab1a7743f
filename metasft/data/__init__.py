"""Data: reading task files, formatting rows, tokenising with correct targets, collation, tasks."""

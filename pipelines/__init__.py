"""Pipelines: scene folders, the stage runner and cache, the CLI, evaluation and reports."""

"""Trajectory schema, store and Ray Data pipelines."""

"""Generators of hostile inputs (broken, malicious and merely unusual files) for the reliability tests."""

"""Toy extensions written against the public extension points only (one file each): tests/test_extension.py
registers them with one line each and runs them through the whole pipeline."""

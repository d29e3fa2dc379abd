"""Hostile inputs: each case a real file, store or job that kernelmap must refuse clearly.

A package (this file), so that its ``conftest`` does not take the place of ``tests/conftest`` as the module
``conftest`` that the test files import helpers from.
"""

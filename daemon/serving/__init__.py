"""The serving process: ``python -m daemon serve``, an OpenAI-compatible server that follows the export.

Like :mod:`daemon.training`, it imports torch and transformers: it is started on its own, never by
the daemon, and nothing but the command line's entry point imports it (docs/layout.md).
"""

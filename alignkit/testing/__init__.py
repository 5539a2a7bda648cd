"""Test fixtures only: the chat-completions test server (`chat_server`).

The shapes world lives in `alignkit.worlds.shapes` and the tiny models in `alignkit.models.tiny`.
"""

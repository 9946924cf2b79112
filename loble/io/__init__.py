"""The real daemon: Loble on anyio sockets, driving loble.core."""

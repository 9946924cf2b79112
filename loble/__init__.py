"""Loble: an L4 TCP load balancer with a sans-I/O core and two drivers."""

__version__ = "0.1.0"

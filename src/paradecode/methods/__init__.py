"""Decoding methods. Each module registers one method; see :mod:`.base`."""

from .base import REGISTRY, Method, all_methods, build_config, get_method, method_options, option, register

__all__ = ["REGISTRY", "Method", "all_methods", "build_config", "get_method", "method_options", "option", "register"]

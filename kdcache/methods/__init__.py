"""Distillation methods: one registry; each method is an nn.Module returning {"loss", parts...}.

Every method adds its extra loss to CE(z_s, y) on the labelled samples of the batch.
Import side effects register the built-in methods.
"""
from __future__ import annotations

from . import customkd, feature, logit, scalekd  # noqa: F401,E402  (registration)
from .base import (
           METHOD_DEFAULTS,
           METHOD_OPTIONS,
           METHODS,
           Method,
           MethodContext,
           MethodError,
           TeacherBatch,
           create_method,
           labelled_only_methods,
           list_methods,
           methods_without_logits,
           parse_method_options,
           register_method,
)

__all__ = ["Method", "MethodContext", "MethodError", "TeacherBatch", "create_method",
           "list_methods", "labelled_only_methods", "methods_without_logits", "parse_method_options",
           "register_method", "METHOD_DEFAULTS", "METHOD_OPTIONS", "METHODS"]
